"""The Hugging Face Hub edge: resolve a revision to its commit, list the files, download them with proof.

huggingface_hub does what it does well here: the revision is resolved once (`model_info`), the
file list and the published digests come from the tree *at that commit* (`list_repo_tree`),
credentials from `build_hf_headers` (it reads `HF_TOKEN`), HTTP from its shared session and errors
from `hf_raise_for_status`. File URLs have `hf_hub_url`'s layout but are built here on the chosen
endpoint (`Hub.file_url`): `hf_hub_url` swaps in another endpoint only when its URL starts with the
`ENDPOINT` huggingface_hub read at import. What huggingface_hub does not do, this module adds:

- every file is downloaded at the pinned 40-hex commit and the `X-Repo-Commit` of each answer
  (redirects included) must name that commit;
- every byte is hashed as it arrives (whole-file SHA-256 and shard digests in one pass, on a thread
  beside the network reads) and compared with what the Hub published: the LFS SHA-256, or the git
  blob SHA-1 of small files; nothing else is trusted, not even the size;
- downloads resume at the exact byte where they stopped, within a run and across runs: the
  `.partial` file is kept, its prefix re-hashed from disk, and the rest fetched with `Range`.

This module knows nothing of the terminal: progress goes through a callback. huggingface_hub is
imported inside the functions so that `sovpack --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sovpack import __version__
from sovpack.common.hashing import READ_SIZE, Digester, FileDigest
from sovpack.common.pipeline import Lane, wait_all
from sovpack.errors import Failure, Refused, SovpackError, UsageError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

MAX_ATTEMPTS = 6  # consecutive failed attempts of one file (an attempt that brings bytes resets the count)
RETRY_WAIT = 1.0  # seconds before the first retry, doubled each time up to 8 s (tests set it to 0)
PROGRESS_STEP = 1024 * 1024  # report progress at most once per MiB
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class Cancelled(SovpackError):
    """Another download of the same fetch failed, or the user interrupted: stop, keep the partial file."""

    exit_code = 3


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a commit, with the digest the Hub publishes for it."""

    repo: str
    commit: str
    path: str
    size: int
    git_blob_id: str  # git object id (for LFS files, the id of the pointer file)
    lfs_sha256: str | None  # SHA-256 of the content, published for LFS files

    @property
    def expected(self) -> tuple[str, str]:
        """(algorithm, digest) the downloaded bytes must match."""
        return ("sha256", self.lfs_sha256) if self.lfs_sha256 else ("git-blob-sha1", self.git_blob_id)

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.commit[:12]}:{self.path}"

    def provenance(self, endpoint: str) -> dict:
        """The `source` of this file in sovpack.json (docs/fetch.md)."""
        source = {"type": "hub", "endpoint": endpoint, "repo": self.repo, "commit": self.commit, "path": self.path}
        if self.lfs_sha256:
            source["lfs_sha256"] = self.lfs_sha256
        else:
            source["git_blob_id"] = self.git_blob_id
        return source


@dataclass(frozen=True)
class Snapshot:
    """A repository at the commit one revision resolved to."""

    repo: str
    commit: str  # the 40-hex commit the revision resolved to
    files: dict[str, RemoteFile]


def check_repo_id(repo: str, what: str = "repository") -> str:
    if not REPO_ID_RE.match(repo) or ".." in repo or "--" in repo or len(repo) > 96:
        raise UsageError(f"{what} {repo!r} is not a Hugging Face repository id like org/name")
    return repo


def public_endpoint(url: str) -> str:
    """`url` without credentials, query or trailing slash: what may be written into a bundle."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class Hub:
    """A Hub (huggingface.co or a mirror) as seen by fetch."""

    def __init__(self, endpoint: str | None = None):
        url = (endpoint or default_endpoint()).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            origin = "--endpoint" if endpoint else "HF_ENDPOINT"
            raise UsageError(f"{origin} {url!r} is not an http:// or https:// URL")
        self.url = url
        self.endpoint = public_endpoint(url)

    # ------------------------------------------------------------------ metadata

    def snapshot(self, repo: str, revision: str) -> Snapshot:
        """Resolve `revision` once, then list every file at the resolved commit."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.url, library_name="sovpack", library_version=__version__)
        with self.errors(repo, revision):
            info = api.model_info(repo, revision=revision, expand=["sha"])
        commit = info.sha or ""
        if not COMMIT_RE.match(commit):
            raise Failure(f"{self.endpoint} resolved {repo}@{revision} to {commit!r}, which is not a 40-hex commit id")
        if COMMIT_RE.match(revision) and commit != revision:
            raise Refused(f"{self.endpoint} answered commit {commit} when asked for {repo} at commit {revision}")
        files: dict[str, RemoteFile] = {}
        with self.errors(repo, revision):
            for entry in api.list_repo_tree(repo, revision=commit, recursive=True):
                if isinstance(entry, RepoFile):
                    files[entry.path] = self._remote_file(repo, commit, entry)
        return Snapshot(repo, commit, files)

    def _remote_file(self, repo: str, commit: str, entry) -> RemoteFile:
        lfs = entry.lfs.sha256 if entry.lfs is not None else None
        size = entry.size
        if (lfs is not None and not _HEX64.match(lfs)) or not COMMIT_RE.match(entry.blob_id or ""):
            raise Failure(f"{self.endpoint} lists {repo}@{commit[:12]}:{entry.path} without a valid digest")
        if not isinstance(size, int) or size < 0:
            raise Failure(f"{self.endpoint} lists {repo}@{commit[:12]}:{entry.path} without a valid size")
        return RemoteFile(repo, commit, entry.path, size, entry.blob_id, lfs)

    def check_access(self, f: RemoteFile) -> None:
        """HEAD one file: a gated repo or a lying commit header shows before anything is downloaded."""
        from huggingface_hub import get_hf_file_metadata

        url = self.file_url(f)
        with self.errors(f.repo, f.commit, f.path, retried=False):
            meta = get_hf_file_metadata(url, token=None, library_name="sovpack", library_version=__version__)
        self._check_commit(f, [meta.commit_hash])

    # ------------------------------------------------------------------ download

    def file_url(self, f: RemoteFile) -> str:
        """`hf_hub_url`'s layout, built on this endpoint (hf_hub_url only swaps an endpoint it knew at import)."""
        from urllib.parse import quote

        return f"{self.url}/{f.repo}/resolve/{quote(f.commit, safe='')}/{quote(f.path)}"

    def download(
        self,
        f: RemoteFile,
        partial: Path,
        on_bytes: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> FileDigest:
        """Download `f` into `partial` (continuing what is there), verify it, and return its digests.

        On a digest mismatch the partial file is deleted and Refused is raised; on a network failure
        the partial file is kept, so that the next call continues from its last byte.
        """
        url = self.file_url(f)
        report = _Throttled(on_bytes)
        failures = 0
        with _VerifyingFile(f, partial, report) as target:
            while target.offset < f.size or (f.size == 0 and not target.started):
                before = target.offset
                try:
                    self._transfer(url, f, target, cancel)
                    if target.offset < f.size:
                        raise _ShortBody(f"the answer ended after {target.offset} of {f.size} bytes")
                except _TRANSIENT_ERRORS() as e:
                    failures = 1 if target.offset > before else failures + 1
                    if failures >= MAX_ATTEMPTS:
                        raise Failure(
                            f"downloading {f.where} from {self.endpoint} failed {failures} times in a row ({_describe(e)}); "
                            f"{target.offset} of {f.size} bytes are kept: re-run the same command to continue from there"
                        ) from None
                    _sleep(min(8.0, RETRY_WAIT * 2 ** (failures - 1)), cancel)
            report.flush()
            return target.finish()

    def _transfer(self, url: str, f: RemoteFile, target: _VerifyingFile, cancel: threading.Event | None) -> None:
        """One GET from `target.offset` to the end, streamed into `target`."""
        import httpx2
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(library_name="sovpack", library_version=__version__)
        headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, never of a compressed form
        if target.offset:
            headers["Range"] = f"bytes={target.offset}-"
        timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT)
        target.started = True
        with self.errors(f.repo, f.commit, f.path, retried=True):
            with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as response:
                if response.status_code in _RETRY_STATUS:
                    raise _ServerBusy(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    response.read()  # the error body carries the Hub's message
                    hf_raise_for_status(response)
                self._check_commit(f, [r.headers.get("X-Repo-Commit") for r in (*response.history, response)])
                if target.offset and response.status_code != 206:
                    target.restart()  # the server ignored the range: take the whole file again
                elif response.status_code == 206:
                    _check_content_range(f, response.headers.get("Content-Range"), target.offset)
                encoding = response.headers.get("Content-Encoding", "identity").lower()
                chunks = response.iter_raw() if encoding == "identity" else response.iter_bytes()
                for chunk in chunks:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"download of {f.where} stopped")
                    target.write(chunk)

    def _check_commit(self, f: RemoteFile, reported: list[str | None]) -> None:
        for commit in reported:
            if commit and commit != f.commit:
                raise Refused(
                    f"{self.endpoint} served {f.repo}:{f.path} for commit {commit}, but the fetch is pinned to "
                    f"{f.commit}; refusing a file from another commit"
                )

    # ------------------------------------------------------------------ errors

    @contextmanager
    def errors(self, repo: str, revision: str, path: str | None = None, *, retried: bool = False) -> Iterator[None]:
        """Turn huggingface_hub and httpx2 exceptions into sovpack's three kinds of failure.

        With `retried`, transient network errors pass through unchanged: the caller retries them.
        """
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        what = f"{repo}:{path}" if path else repo
        token_hint = "set HF_TOKEN to a token of an account that has access to it"
        try:
            yield
        except GatedRepoError as e:
            raise Failure(
                f"{what}: access to {repo} on {self.endpoint} was denied (HTTP {_status(e)}); the repository is "
                f"gated or private and a token with access is needed: {token_hint}"
            ) from None
        except RepositoryNotFoundError as e:
            if _status(e) == 403:
                raise Failure(f"{what}: access to {repo} on {self.endpoint} was denied (HTTP 403): {token_hint}") from None
            raise UsageError(
                f"repository {repo} was not found on {self.endpoint} (HTTP {_status(e)}); check the name, "
                f"or if it is private or gated, {token_hint}"
            ) from None
        except RevisionNotFoundError:
            raise UsageError(
                f"revision {revision!r} was not found in {repo} on {self.endpoint}: give a branch, "
                "a tag or a full 40-hex commit of that repository"
            ) from None
        except RemoteEntryNotFoundError:
            raise Failure(f"{self.endpoint} listed {what} at {revision} but does not serve it (HTTP 404)") from None
        except HfHubHTTPError as e:
            status = _status(e)
            if status in (401, 403):
                raise Failure(f"{what}: access to {repo} on {self.endpoint} was denied (HTTP {status}): {token_hint}") from None
            raise Failure(f"{self.endpoint} answered HTTP {status} for {what}: {_server_message(e)}") from None
        except OfflineModeIsEnabled:
            raise Failure("HF_HUB_OFFLINE is set: unset it to fetch from the Hub") from None
        except HFValidationError as e:
            raise UsageError(f"{what}: {e}") from None
        except httpx2.HTTPError as e:
            if retried and isinstance(e, _TRANSIENT_ERRORS()):
                raise
            raise Failure(f"cannot reach {self.endpoint} for {what}: {_describe(e)}") from None


# ---------------------------------------------------------------------- download internals


class _ShortBody(Exception):
    pass


class _ServerBusy(Exception):
    pass


def _TRANSIENT_ERRORS() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError, _ShortBody, _ServerBusy)


def _status(error) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _server_message(error) -> str:
    response = getattr(error, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return message or str(error).strip().splitlines()[0]


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def _sleep(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is not None:
        if cancel.wait(seconds):
            raise Cancelled("download stopped")
    elif seconds:
        time.sleep(seconds)


def _check_content_range(f: RemoteFile, header: str | None, offset: int) -> None:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", header or "")
    if not match or int(match.group(1)) != offset:
        raise Failure(f"{f.where}: asked for bytes from {offset}, the server answered the range {header!r}")


class _Throttled:
    """Progress callback called at most once per PROGRESS_STEP bytes (a call per 64 KiB costs CPU)."""

    def __init__(self, callback: Callable[[int], None] | None):
        self.callback, self.pending = callback, 0

    def __call__(self, n: int) -> None:
        if self.callback is None:
            return
        self.pending += n
        if self.pending >= PROGRESS_STEP or n < 0:
            self.callback(self.pending)
            self.pending = 0

    def flush(self) -> None:
        if self.callback is not None and self.pending:
            self.callback(self.pending)
            self.pending = 0


class _Hashing:
    """The digests of one download (Digester, and the git blob SHA-1 of a small file), on a lane beside the writer.

    At most MAX_QUEUED blocks wait for the lane: a network faster than hashing waits, memory stays bounded.
    """

    MAX_QUEUED = 4

    def __init__(self, f: RemoteFile):
        self.digester = Digester()
        self.blob = None if f.lfs_sha256 else hashlib.sha1(b"blob %d\0" % f.size)
        self.lane = Lane(f"hash {f.path}")
        self.queued: deque[Future] = deque()

    def _update(self, block: bytes) -> None:
        self.digester.update(block)
        if self.blob is not None:
            self.blob.update(block)

    def put(self, block: bytes) -> None:
        if len(self.queued) >= self.MAX_QUEUED:
            self.queued.popleft().result()  # wait for room; an error of the hashing is raised here
        self.queued.append(self.lane.submit(self._update, block))

    def close(self) -> None:
        """Wait until every block is hashed; raise the first error."""
        self.lane.close()
        wait_all(list(self.queued))
        self.queued.clear()

    def abandon(self) -> None:
        """Stop: blocks not yet hashed are dropped, and so are the digests."""
        self.lane.close(cancel=True)
        self.queued.clear()


class _VerifyingFile:
    """The `.partial` file of one download, hashed as it is written."""

    def __init__(self, f: RemoteFile, path: Path, report: _Throttled):
        self.f, self.path, self.report = f, path, report
        self.started = False
        self.offset = 0
        self.file = None
        self.hasher: _Hashing | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0

    def __enter__(self) -> _VerifyingFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "ab")
        self.hasher = _Hashing(self.f)
        kept = self.file.tell()
        if kept > self.f.size:
            self.restart()
        elif kept:
            self._rehash_prefix(kept)
        return self

    def _rehash_prefix(self, length: int) -> None:
        """Hash the bytes a previous run left, from disk, before continuing after them."""
        with open(self.path, "rb") as prefix:
            while self.offset < length and (block := prefix.read(min(READ_SIZE, length - self.offset))):
                self.hasher.put(block)
                self.offset += len(block)
        self.report(self.offset)

    def write(self, chunk: bytes) -> None:
        if self.offset + len(chunk) > self.f.size:
            raise Refused(f"{self.f.where}: the server sent more than the {self.f.size} bytes the Hub lists for it")
        self.file.write(chunk)
        self.offset += len(chunk)
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size >= READ_SIZE:
            self._hand_over()
        self.report(len(chunk))

    def _hand_over(self) -> None:
        if self.pending:
            self.hasher.put(b"".join(self.pending))
            self.pending, self.pending_size = [], 0

    def restart(self) -> None:
        """Drop what is there and start the file from byte 0."""
        self.pending, self.pending_size = [], 0
        self.hasher.abandon()
        self.file.seek(0)
        self.file.truncate()
        self.report(-self.offset)
        self.offset = 0
        self.hasher = _Hashing(self.f)

    def finish(self) -> FileDigest:
        self._hand_over()
        self.file.flush()
        os.fsync(self.file.fileno())  # on disk before the state records it as checked: a re-run trusts it by size and mtime
        hasher, self.hasher = self.hasher, None
        hasher.close()
        digest = hasher.digester.finish()
        algorithm, expected = self.f.expected
        actual = digest.sha256 if hasher.blob is None else hasher.blob.hexdigest()
        if digest.size != self.f.size or actual != expected:
            self.file.close()
            self.path.unlink(missing_ok=True)
            raise Refused(
                f"{self.f.where} does not match what the Hub published: expected {algorithm} {expected} "
                f"({self.f.size} bytes), got {actual} ({digest.size} bytes); the downloaded bytes were deleted"
            )
        return digest

    def __exit__(self, *exc) -> None:
        try:
            if self.hasher is not None:
                self.hasher.abandon()  # the partial file stays for the next run, which hashes it again
        finally:
            if self.file is not None and not self.file.closed:
                self.file.close()
