"""A small, real Hugging Face Hub-compatible HTTP server for tests.

The real `huggingface_hub` client talks to it over a loopback socket:

    with HubServer() as hub:
        commit = hub.add_repo("org/model", {"config.json": b"{}", "model.safetensors": weights})
        hf_hub_download("org/model", "config.json", endpoint=hub.url)

Implemented routes (model repos only):

    GET  /api/models/{repo_id}[/revision/{revision}]        model info (?blobs=true, ?expand=...)
    GET  /api/models/{repo_id}/tree/{revision}[/{path}]     tree listing (?recursive, ?expand, Link pagination)
    POST /api/models/{repo_id}/paths-info/{revision}        form or JSON body: paths, expand
    GET  /api/models/{repo_id}/refs                         branches and tags
    HEAD|GET /{repo_id}/resolve/{revision}/{path}           file content (Range supported)
    HEAD|GET /cdn-lfs/{sha256}?repo=..&file=..              LFS content when `cdn_redirects=True`

Stdlib only. Faults can be injected: per file, corruption, dropped connections, HTTP errors and a
mishandled `Range`; per repo, a lying commit header or a model info that resolves to another commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

CHUNK_SIZE = 1 << 20
DEFAULT_LFS_THRESHOLD = 1024
LFS_EXTENSIONS = (".safetensors", ".gguf", ".bin")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")


class LoggedRequest(NamedTuple):
    method: str
    path: str  # percent-decoded, without the query string
    range: str | None  # the raw `Range` header, if any


class HubError(Exception):
    """An error response shaped like the Hub's (status + `X-Error-Code` + JSON body)."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


# --------------------------------------------------------------------------- content model


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _hash_file(path: Path, hasher) -> str:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Blob:
    """One file at one commit. `blob_id` is the git object id (of the pointer file for LFS files)."""

    path: str
    size: int
    blob_id: str
    sha256: str | None  # only for LFS files
    source: bytes | Path = field(repr=False)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.blob_id

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def lfs_json(self, sha_key: str) -> dict:
        return {sha_key: self.sha256, "size": self.size, "pointerSize": self.pointer_size}


def make_blob(path: str, content: bytes | Path, lfs_threshold: int) -> Blob:
    size = content.stat().st_size if isinstance(content, Path) else len(content)
    if size > lfs_threshold or path.endswith(LFS_EXTENSIONS):
        if isinstance(content, Path):
            sha256 = _hash_file(content, hashlib.sha256())
        else:
            sha256 = hashlib.sha256(content).hexdigest()
        return Blob(path, size, git_blob_id(lfs_pointer(sha256, size)), sha256, content)
    if isinstance(content, Path):
        hasher = hashlib.sha1(b"blob %d\0" % size)
        return Blob(path, size, _hash_file(content, hasher), None, content)
    return Blob(path, size, git_blob_id(content), None, content)


def _git_tree_ids(files: dict[str, Blob]) -> dict[str, str]:
    """Real git tree ids for every directory ("" is the root)."""
    children: dict[str, dict[str, str | None]] = {"": {}}  # dir -> {name: blob id, or None for a subdir}
    for path, blob in files.items():
        parts = path.split("/")
        for depth in range(len(parts)):
            parent, name = "/".join(parts[:depth]), parts[depth]
            is_file = depth == len(parts) - 1
            children.setdefault(parent, {})[name] = blob.blob_id if is_file else None
    ids: dict[str, str] = {}

    def tree_id(directory: str) -> str:
        entries = []
        for name, oid in children[directory].items():
            if oid is None:
                sub = tree_id(f"{directory}/{name}" if directory else name)
                entries.append((name + "/", b"40000 %s\0" % name.encode() + bytes.fromhex(sub)))
            else:
                entries.append((name, b"100644 %s\0" % name.encode() + bytes.fromhex(oid)))
        body = b"".join(entry for _, entry in sorted(entries))  # git sorts subdirs as "name/"
        ids[directory] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        return ids[directory]

    tree_id("")
    return ids


@dataclass(frozen=True)
class Commit:
    oid: str
    files: dict[str, Blob]
    title: str
    date: str
    parent: Commit | None
    trees: dict[str, str]  # directory path -> git tree id

    def last_touch(self, path: str) -> Commit:
        """Oldest ancestor in which `path` still has the same content (what the Hub calls lastCommit)."""
        oid = self._oid_of(path)
        commit = self
        while commit.parent is not None and commit.parent._oid_of(path) == oid:
            commit = commit.parent
        return commit

    def _oid_of(self, path: str) -> str | None:
        blob = self.files.get(path)
        return blob.blob_id if blob else self.trees.get(path)


@dataclass
class Repo:
    repo_id: str
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None

    def resolve(self, revision: str) -> Commit | None:
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix):
                revision = revision[len(prefix) :]
                return self.commits.get(refs.get(revision, ""))
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and COMMIT_RE.fullmatch(revision):
            oid = revision
        return self.commits.get(oid or "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Drop:
    nbytes: int
    remaining: int
    abort: bool


# --------------------------------------------------------------------------- public API


class HubServer:
    """A Hub-compatible server on 127.0.0.1, serving from a daemon thread."""

    def __init__(self, *, cdn_redirects: bool = False, tree_page_size: int = 1000):
        # cdn_redirects: LFS files answer /resolve with a 302 to another origin (like the Hub's CDN),
        # reached as "localhost" so that the client treats it as a foreign host.
        self.cdn_redirects = cdn_redirects
        self.tree_page_size = tree_page_size
        self._lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        self._lfs_blobs: dict[str, Blob] = {}
        self._log: list[LoggedRequest] = []
        self._corrupt: set[tuple[str, str]] = set()
        self._lies: dict[str, str] = {}
        self._drops: dict[tuple[str, str], _Drop] = {}
        self._failures: dict[tuple[str, str], list[int]] = {}  # (repo, path) -> [status, times left]
        self._ranges_ignored: set[tuple[str, str]] = set()
        self._content_ranges: dict[tuple[str, str], str] = {}
        self._resolved_as: dict[str, str] = {}
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler, self)
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, name="hubserver", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._httpd.serve_forever(poll_interval=0.01)  # shutdown() waits up to one poll interval

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._thread.join()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        tags: tuple[str, ...] | list[str] = (),
        gated_token: str | None = None,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        message: str | None = None,
    ) -> str:
        """Commit `files` (the full content of the new revision) on `branch`; return the 40-hex commit id.

        Calling it again for the same repo adds a commit on top of `branch`; older commits stay reachable by id.
        `gated_token` gates downloads: only `Authorization: Bearer <gated_token>` may fetch files (None keeps the
        repo's current setting). Files larger than `lfs_threshold` bytes or with a weights extension are LFS files.
        """
        blobs = {path: make_blob(path, content, lfs_threshold) for path, content in sorted(files.items())}
        with self._lock:
            repo = self._repos.setdefault(repo_id, Repo(repo_id, created_at=_now()))
            commit = self._new_commit(repo, blobs, branch, message)
            repo.branches[branch] = commit.oid
            repo.tags.update(dict.fromkeys(tags, commit.oid))
            if gated_token is not None:
                repo.gated_token = gated_token
            self._lfs_blobs.update({b.sha256: b for b in blobs.values() if b.is_lfs})
        return commit.oid

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve `path` with one byte flipped (same length) while still advertising the true digests."""
        with self._lock:
            self._corrupt.add((repo_id, path))

    def lie_about_commit(self, repo_id: str, commit: str) -> None:
        """Report `commit` in the `X-Repo-Commit` header of every /resolve answer for this repo."""
        with self._lock:
            self._lies[repo_id] = commit

    def drop_after(self, repo_id: str, path: str, nbytes: int, *, times: int = 1, abort: bool = False) -> None:
        """Cut the next `times` GET bodies of `path` after `nbytes` bytes of that response's body.

        By default the connection is closed cleanly (FIN): the client sees a short body. With `abort=True` it is
        reset (RST): the client sees a connection error. Responses not longer than `nbytes` are not cut.
        """
        with self._lock:
            self._drops[(repo_id, path)] = _Drop(nbytes, times, abort)

    def resolve_as(self, repo_id: str, commit: str) -> None:
        """Report `commit` as the `sha` of every model info answer for this repo, whatever revision was asked."""
        with self._lock:
            self._resolved_as[repo_id] = commit

    def fail_gets(self, repo_id: str, path: str, status: int, *, times: int = 1) -> None:
        """Answer the next `times` GETs of `path` with HTTP `status` (a Hub-shaped error); HEAD is not affected."""
        with self._lock:
            self._failures[(repo_id, path)] = [status, times]

    def ignore_range(self, repo_id: str, path: str) -> None:
        """Answer every GET of `path` with the whole file (200), whatever `Range` asks (HTTP allows it)."""
        with self._lock:
            self._ranges_ignored.add((repo_id, path))

    def wrong_content_range(self, repo_id: str, path: str, header: str) -> None:
        """Answer range requests for `path` with 206, the bytes asked for, and this `Content-Range` header."""
        with self._lock:
            self._content_ranges[(repo_id, path)] = header

    def clear_faults(self) -> None:
        with self._lock:
            self._corrupt.clear()
            self._lies.clear()
            self._drops.clear()
            self._failures.clear()
            self._ranges_ignored.clear()
            self._content_ranges.clear()
            self._resolved_as.clear()

    @property
    def requests(self) -> list[LoggedRequest]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ----------------------------------------------------------------------- internals (lock held)

    def _new_commit(self, repo: Repo, blobs: dict[str, Blob], branch: str, message: str | None) -> Commit:
        counter = len(repo.commits)
        digest = hashlib.sha1(f"{repo.repo_id}\0{counter}\0".encode())
        for path, blob in blobs.items():
            digest.update(f"{path}\0{blob.etag}\n".encode())
        parent = repo.commits.get(repo.branches.get(branch, ""))
        title = message or ("Initial commit" if counter == 0 else f"Commit #{counter}")
        commit = Commit(digest.hexdigest(), blobs, title, _now(), parent, _git_tree_ids(blobs))
        repo.commits[commit.oid] = commit
        return commit

    # ----------------------------------------------------------------------- internals (for the handler)

    def _record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self._log.append(LoggedRequest(method, path, range_header))

    def _lookup(self, repo_id: str, revision: str | None = None) -> tuple[Repo, Commit | None]:
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise HubError(404, "RepoNotFound", "Repository not found")
            if revision is None:
                return repo, None
            commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _refs(self, repo_id: str) -> tuple[dict[str, str], dict[str, str]]:
        repo, _ = self._lookup(repo_id)
        with self._lock:
            return dict(repo.branches), dict(repo.tags)

    def _reported_commit(self, repo_id: str, oid: str) -> str:
        with self._lock:
            return self._lies.get(repo_id, oid)

    def _resolved_sha(self, repo_id: str, oid: str) -> str:
        with self._lock:
            return self._resolved_as.get(repo_id, oid)

    def _take_failure(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            failure = self._failures.get((repo_id, path))
            if failure is None:
                return None
            failure[1] -= 1
            if failure[1] <= 0:
                del self._failures[(repo_id, path)]
            return failure[0]

    def _range_fault(self, repo_id: str, path: str) -> tuple[bool, str | None]:
        """(ignore Range?, the Content-Range to send instead of the true one)."""
        with self._lock:
            return (repo_id, path) in self._ranges_ignored, self._content_ranges.get((repo_id, path))

    def _is_corrupt(self, repo_id: str, path: str) -> bool:
        with self._lock:
            return (repo_id, path) in self._corrupt

    def _take_drop(self, repo_id: str, path: str, body_length: int) -> _Drop | None:
        with self._lock:
            drop = self._drops.get((repo_id, path))
            if drop is None or body_length <= drop.nbytes:
                return None
            drop.remaining -= 1
            if drop.remaining <= 0:
                del self._drops[(repo_id, path)]
            return drop

    def _lfs_blob(self, sha256: str) -> Blob | None:
        with self._lock:
            return self._lfs_blobs.get(sha256)


# --------------------------------------------------------------------------- JSON documents


def _file_json(blob: Blob, commit: Commit, expand: bool) -> dict:
    entry = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": blob.path}
    if blob.is_lfs:
        entry["lfs"] = blob.lfs_json("oid")
    if expand:
        entry["lastCommit"] = _last_commit_json(commit.last_touch(blob.path))
    return entry


def _dir_json(path: str, commit: Commit, expand: bool) -> dict:
    entry = {"type": "directory", "oid": commit.trees[path], "size": 0, "path": path}
    if expand:
        entry["lastCommit"] = _last_commit_json(commit.last_touch(path))
    return entry


def _last_commit_json(commit: Commit) -> dict:
    return {"id": commit.oid, "title": commit.title, "date": commit.date}


def _entry_json(path: str, commit: Commit, expand: bool) -> dict | None:
    if path in commit.files:
        return _file_json(commit.files[path], commit, expand)
    if path in commit.trees and path:
        return _dir_json(path, commit, expand)
    return None


def _tree_paths(commit: Commit, base: str, recursive: bool) -> list[str]:
    """Paths of the entries (files and directories) under directory `base`."""
    prefix = f"{base}/" if base else ""
    paths = [p for p in [*commit.trees, *commit.files] if p and p.startswith(prefix)]
    if not recursive:
        paths = [p for p in paths if "/" not in p[len(prefix) :]]
    return sorted(paths)


def _model_info_json(repo: Repo, commit: Commit, blobs: bool, security: bool) -> dict:
    namespace = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
    tags = sorted({ext.lstrip(".") for ext in (".safetensors", ".gguf") if any(p.endswith(ext) for p in commit.files)})
    info = {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": namespace,
        "sha": commit.oid,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": False,
        "gated": "auto" if repo.gated_token else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [*tags, "region:us"],
        "library_name": None,
        "siblings": [_sibling_json(blob, blobs) for blob in commit.files.values()],
        "spaces": [],
        "usedStorage": sum(blob.size for blob in commit.files.values()),
    }
    if security:
        info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
    return info


def _sibling_json(blob: Blob, with_blobs: bool) -> dict:
    sibling = {"rfilename": blob.path}
    if with_blobs:
        sibling.update(size=blob.size, blobId=blob.blob_id)
        if blob.is_lfs:
            sibling["lfs"] = blob.lfs_json("sha256")
    return sibling


def _is_true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true")


# --------------------------------------------------------------------------- body streaming


def _iter_chunks(source: bytes | Path, start: int, stop: int) -> Iterator[tuple[int, bytes | memoryview]]:
    if isinstance(source, Path):
        with source.open("rb") as f:
            f.seek(start)
            offset = start
            while offset < stop and (chunk := f.read(min(CHUNK_SIZE, stop - offset))):
                yield offset, chunk
                offset += len(chunk)
    else:
        view = memoryview(source)
        for offset in range(start, stop, CHUNK_SIZE):
            yield offset, view[offset : min(offset + CHUNK_SIZE, stop)]


def _flip(chunk: bytes | memoryview, index: int) -> bytes:
    data = bytearray(chunk)
    data[index] ^= 0xFF
    return bytes(data)


_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) for a single-range `Range` header; None to serve the whole file."""
    match = _RANGE_RE.fullmatch(header) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None  # absent, multi-range or malformed: ignoring it is allowed
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        start, stop = max(size - int(last), 0), size
    else:
        start, stop = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= stop:
        raise HubError(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, stop


# --------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, hub: HubServer):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def close_connections(self) -> None:
        """Wake up handler threads idling on keep-alive connections."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # dropped clients are not errors
            super().handle_error(request, client_address)


_REPO = r"(?P<repo>[^/?]+(?:/[^/?]+)?)"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("GET", re.compile(rf"/api/models/{_REPO}"), "_model_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)"), "_model_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "_tree"),
    ("POST", re.compile(rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)"), "_paths_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/refs"), "_refs"),
    ("HEAD GET", re.compile(r"/cdn-lfs/(?P<sha256>[0-9a-f]{64})"), "_cdn"),
    ("HEAD GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "_resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass  # client went away (broken pipe, reset, shutdown by close())

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.hub._record(method, unquote(url.path), self.headers.get("Range"))
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            handler, params = self._route(method, url.path)
            handler(method, **{k: unquote(v) for k, v in params.items() if v is not None})
        except HubError as error:
            self._send_error(method, error)
        except OSError:
            raise
        except Exception as error:  # noqa: BLE001 - a bug in this server: make it loud, and answer anyway
            traceback.print_exc()
            self._send_error(method, HubError(500, None, f"hubserver bug: {error!r}"))

    def _route(self, method: str, path: str) -> tuple[Callable, dict[str, str]]:
        for methods, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                if method not in methods.split():
                    raise HubError(405, None, "Method not allowed")
                return getattr(self, name), match.groupdict()
        raise HubError(404, None, "Not Found")

    # ----------------------------------------------------------------------- responses

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", method: str = "GET") -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, document, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(document).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(self, method: str, error: HubError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        body = json.dumps({"error": error.message}).encode()
        self._send(error.status, {**headers, **error.headers}, body, method)

    # ----------------------------------------------------------------------- API routes

    def _model_info(self, method: str, repo: str, rev: str = "main") -> None:
        repo_obj, commit = self.hub._lookup(repo, rev)
        info = _model_info_json(repo_obj, commit, _is_true(self.query.get("blobs")), "securityStatus" in self.query)
        info["sha"] = self.hub._resolved_sha(repo, commit.oid)
        if "expand" in self.query:  # only the requested properties, like the Hub
            info = {k: v for k, v in info.items() if k in {"_id", "id", *self.query["expand"]}}
        self._send_json(info)

    def _tree(self, method: str, repo: str, rev: str, path: str = "") -> None:
        _, commit = self.hub._lookup(repo, rev)
        path = path.strip("/")
        if path not in commit.trees:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev!r}")
        expand = _is_true(self.query.get("expand"))
        paths = _tree_paths(commit, path, _is_true(self.query.get("recursive")))
        start = int(self.query.get("cursor", ["0"])[-1])
        page = paths[start : start + self.hub.tree_page_size]
        headers = {}
        if start + len(page) < len(paths):
            params = {k: v[-1] for k, v in self.query.items()} | {"cursor": start + len(page)}
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{urlencode(params)}>; rel="next"'
        self._send_json([_entry_json(p, commit, expand) for p in page], headers)

    def _paths_info(self, method: str, repo: str, rev: str) -> None:
        _, commit = self.hub._lookup(repo, rev)
        paths, expand = self._paths_info_params()
        entries = [_entry_json(p.strip("/"), commit, expand) for p in paths]
        self._send_json([entry for entry in entries if entry is not None])  # unknown paths are skipped

    def _paths_info_params(self) -> tuple[list[str], bool]:
        if "json" in self.headers.get("Content-Type", ""):
            document = json.loads(self.body or b"{}")
            paths = document.get("paths", [])
            return ([paths] if isinstance(paths, str) else paths), str(document.get("expand")).lower() == "true"
        form = parse_qs(self.body.decode())
        return form.get("paths", []), _is_true(form.get("expand"))

    def _refs(self, method: str, repo: str) -> None:
        branches, tags = self.hub._refs(repo)

        def refs(kind: str, names: dict[str, str]) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]

        document = {"branches": refs("heads", branches), "converts": [], "tags": refs("tags", tags)}
        if _is_true(self.query.get("include_prs")):
            document["pullRequests"] = []
        self._send_json(document)

    # ----------------------------------------------------------------------- file routes

    def _resolve(self, method: str, repo: str, rev: str, path: str) -> None:
        repo_obj, _ = self.hub._lookup(repo)
        self._check_access(repo_obj)
        _, commit = self.hub._lookup(repo, rev)
        headers = {"X-Repo-Commit": self.hub._reported_commit(repo, commit.oid)}
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", "Entry not found", headers)
        headers["ETag"] = f'"{blob.etag}"'
        if blob.is_lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        if blob.is_lfs and self.hub.cdn_redirects:
            self._redirect_to_cdn(method, repo, blob, headers)
        else:
            self._send_blob(method, repo, blob, headers)

    def _check_access(self, repo: Repo) -> None:
        if repo.gated_token is None or self.headers.get("Authorization") == f"Bearer {repo.gated_token}":
            return
        if self.headers.get("Authorization") is None:
            message = f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated."
            raise HubError(401, "GatedRepo", message)
        raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not authorized.")

    def _redirect_to_cdn(self, method: str, repo: str, blob: Blob, headers: dict[str, str]) -> None:
        query = urlencode({"repo": repo, "file": blob.path})
        location = f"http://localhost:{self.hub.port}/cdn-lfs/{blob.sha256}?{query}"
        self._send(302, {**headers, "Location": location}, method=method)

    def _cdn(self, method: str, sha256: str) -> None:
        blob = self.hub._lfs_blob(sha256)
        if blob is None:
            raise HubError(404, None, "NoSuchKey")
        repo = self.query.get("repo", [""])[-1]
        self._send_blob(method, repo, blob, {"ETag": f'"{sha256}"'}, fault_path=self.query.get("file", [""])[-1])

    def _send_blob(self, method: str, repo: str, blob: Blob, headers: dict[str, str], fault_path: str = "") -> None:
        fault_path = fault_path or blob.path
        status = self.hub._take_failure(repo, fault_path) if method == "GET" else None
        if status is not None:
            raise HubError(status, None, f"injected HTTP {status}", headers)
        ignore_range, content_range = self.hub._range_fault(repo, fault_path)
        byte_range = None if ignore_range else _parse_range(self.headers.get("Range"), blob.size)
        start, stop = byte_range or (0, blob.size)
        headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        headers["Content-Length"] = str(stop - start)
        if byte_range:
            headers["Content-Range"] = content_range or f"bytes {start}-{stop - 1}/{blob.size}"
        self.send_response(206 if byte_range else 200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "HEAD":
            return
        drop = self.hub._take_drop(repo, fault_path, stop - start)
        corrupt = self.hub._is_corrupt(repo, fault_path)
        self._write_body(blob, start, start + drop.nbytes if drop else stop, corrupt)
        if drop:
            self._drop_connection(drop.abort)

    def _write_body(self, blob: Blob, start: int, stop: int, corrupt: bool) -> None:
        if isinstance(blob.source, Path) and not corrupt and stop > start:
            with blob.source.open("rb") as f:
                self.connection.sendfile(f, start, stop - start)  # zero-copy for big on-disk files
            return
        flip_at = blob.size // 2 if corrupt and blob.size else -1
        for offset, chunk in _iter_chunks(blob.source, start, stop):
            if offset <= flip_at < offset + len(chunk):
                chunk = _flip(chunk, flip_at - offset)
            self.wfile.write(chunk)

    def _drop_connection(self, abort: bool) -> None:
        self.close_connection = True  # a clean close (FIN) happens when the handler returns
        if abort:
            # SO_LINGER 0 + close => RST. rfile/wfile keep the socket object open: close the detached fd instead.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(self.connection.detach())
