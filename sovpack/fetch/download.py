"""Fetch: resolve, select, download with proof into a staging directory, publish a bundle by one rename.

The bundle is exactly what `sovpack pack` produces (same sovpack.json schema, built with
`pack.file_entry` and `StagedBundle`), with each file's `source` and the top-level `sources`
recording where the bytes came from (docs/fetch.md).

Resume. Everything happens in `.<out>.partial/` (StagedBundle's hidden sibling of `out`). Fetch's
own bookkeeping lives in its `.sovpack-fetch/` folder: `state.json` lists the files already
downloaded *and checked* (with their digests, size and mtime), and `partial/<path>` holds files
being downloaded. A re-run of the same command keeps every checked file whose published digest
is unchanged, continues each partial file from its last byte (re-hashing the prefix from disk),
and deletes anything else found in the staging directory. `out` appears only when every file is
checked: a half-written bundle is never published.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from sovpack import __version__
from sovpack.bundle.metadata import BundleMetadata, FileEntry, check_name, parse_expiry
from sovpack.bundle.pack import StagedBundle, file_entry
from sovpack.common.files import DISK_FULL, HeldLock, require_free_space, write_atomically
from sovpack.common.hashing import SHARD_SIZE, FileDigest
from sovpack.common.progress import Progress
from sovpack.common.sizes import human_size
from sovpack.errors import Failure, UsageError
from sovpack.fetch.hub import Hub, RemoteFile
from sovpack.fetch.plan import WORK_DIR, Plan, make_plan
from sovpack.fetch.spec import FetchRequest

STATE_FORMAT = "sovpack-fetch-state"
STATE_VERSION = 1
MAX_PARALLEL = 8  # files downloaded at once (as snapshot_download)
SPACE_MARGIN = 16 * 1024 * 1024


FileState = Literal["download", "partial", "staged"]  # nothing kept, `kept` bytes kept, complete and checked


@dataclass(frozen=True)
class FileStatus:
    state: FileState
    kept: int = 0


@dataclass
class FetchResult:
    plan: Plan
    status: dict[str, FileStatus]
    metadata: BundleMetadata | None = None  # None for a dry run
    out: Path | None = None

    @property
    def to_download(self) -> int:
        return sum(f.size - self.status[f.path].kept for f in self.plan.files if self.status[f.path].state != "staged")


def bundle_name(request: FetchRequest) -> str:
    """--name, else the spec's name (checked when the spec was read), else the model repository's name."""
    name = request.name or request.model.repo.split("/")[-1]
    try:
        return check_name(name, UsageError)
    except UsageError as e:
        raise UsageError(f"{e}; choose one with --name") from None


def fetch(
    request: FetchRequest,
    out: Path | None,
    *,
    endpoint: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> FetchResult:
    """Fetch `request` into a new bundle at `out` (or, with `dry_run`, only say what would be fetched).

    `progress` gets a note per resolved commit and per file left out, then a phase for the
    whole download and an item per file. Raises: UsageError (the request or `out`), Refused (a
    file that does not match what the Hub published, one the file-kind gate refuses: a pickle
    by its bytes or a kind sovpack does not check; an unsafe name), Failure (network, disk).
    """
    progress = progress or Progress()
    now = now or datetime.now(timezone.utc)
    name = bundle_name(request)
    expires = parse_expiry(request.expires, now)
    if out is None and not dry_run:
        raise UsageError("--out is required (the new bundle directory)")
    if out is not None and out.exists() and not dry_run:
        raise UsageError(f"{out} already exists; choose a new --out directory")
    hub = Hub(endpoint)
    plan = make_plan(request, hub)
    status = (
        staged_status(StagedBundle.staging_dir(out), plan)
        if out is not None
        else {f.path: FileStatus("download") for f in plan.files}
    )
    result = FetchResult(plan, status, out=out)
    _note_plan(plan, progress)
    if dry_run:
        return result
    _check_free_space(out, result.to_download)
    progress.phase(f"total ({len(plan.files)} files)", plan.total_size)

    staged = StagedBundle(out, resume=True)
    try:
        return _fetch_into(staged, hub, plan, result, progress, name=name, expires=expires, now=now, version=request.version)
    except OSError as e:
        raise _write_failure(e, "the bundle", staged.dir) from None


def _fetch_into(
    staged: StagedBundle,
    hub: Hub,
    plan: Plan,
    result: FetchResult,
    progress: Progress,
    *,
    name: str,
    version: int,
    expires: datetime | None,
    now: datetime,
) -> FetchResult:
    """Download what the staging directory lacks, describe every file, publish the bundle."""
    with _Staging(staged.dir) as staging:
        status = staging.reconcile(plan)
        result.status = status
        todo = [f for f in plan.files if status[f.path].state != "staged"]
        digests = {f.path: staging.complete[f.path].digest for f in plan.files if status[f.path].state == "staged"}
        for f in plan.files:
            if status[f.path].state == "staged":
                progress.item_started(f.path, f.size, f.size)
                progress.item_finished(f.path, _checked(f), reused=True)
        entries = _download_all(hub, staging, todo, status, progress)
        for f in plan.files:
            if f.path not in entries:
                entries[f.path] = file_entry(staging.root / f.path, f.path, digests[f.path], f.provenance(hub.endpoint))
    metadata = BundleMetadata(
        name=name,
        version=version,
        created=now,
        expires=expires,
        created_by=f"sovpack {__version__}",
        shard_size=SHARD_SIZE,
        files=[entries[f.path] for f in plan.files],
        sources=plan.sources(),
    )
    shutil.rmtree(staged.dir / WORK_DIR)
    staged.publish(metadata)
    result.metadata = metadata
    return result


def _note_plan(plan: Plan, progress: Progress) -> None:
    for selection, snapshot in plan.snapshots:
        progress.note(f"{selection.repo}@{selection.revision} -> commit {snapshot.commit}")
    for s in plan.skipped:
        progress.note(f"  skipped {s.repo}:{s.path} ({s.reason})")


def _checked(f: RemoteFile) -> str:
    """How a file was checked, for the line that says it is."""
    return f"{human_size(f.size)}, {f.expected[0]} {f.expected[1][:16]}..."


def _download_all(hub: Hub, staging: _Staging, todo: list[RemoteFile], status, progress: Progress) -> dict[str, FileEntry]:
    """Download `todo` in parallel, largest first; the first failure stops the others (their bytes are kept)."""
    entries: dict[str, FileEntry] = {}
    if not todo:
        return entries
    cancel = threading.Event()

    def one(f: RemoteFile) -> FileEntry:
        progress.item_started(f.path, f.size, status[f.path].kept)
        try:
            partial = staging.partial_path(f.path)
            staging.record_partial(f)
            digest = hub.download(f, partial, on_bytes=lambda n: progress.item_advanced(f.path, n), cancel=cancel)
            target = staging.root / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            entry = file_entry(target, f.path, digest, f.provenance(hub.endpoint))  # refuses pickles, checks headers
            staging.record_complete(f, digest)
        except OSError as e:
            raise _write_failure(e, f.path, staging.root) from None
        progress.item_finished(f.path, _checked(f))
        return entry

    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(todo)), thread_name_prefix="fetch") as pool:
        futures = [pool.submit(one, f) for f in sorted(todo, key=lambda f: -f.size)]
        try:
            for future in as_completed(futures):
                entry = future.result()
                entries[entry.path] = entry
        except BaseException:
            cancel.set()
            for future in futures:
                future.cancel()
            raise
    return entries


def _write_failure(error: OSError, what: str, root: Path) -> Failure:
    if error.errno in DISK_FULL:
        return Failure(
            f"disk full while writing {what} into {root}: free some space and re-run the same command; "
            "what was downloaded so far is kept and the fetch continues from there"
        )
    where = f" ({error.filename})" if error.filename else ""
    return Failure(f"cannot write {what} into {root}{where}: {error.strerror or error}")


def _check_free_space(out: Path, needed: int) -> None:
    if needed <= 0:
        return
    require_free_space(
        out,
        needed + SPACE_MARGIN,
        lambda free: (
            f"not enough free space for this fetch on the file system holding {out}: it needs "
            f"{human_size(needed)} more, {human_size(free)} is free. Free some space or choose another --out; "
            "nothing was downloaded"
        ),
    )


# ---------------------------------------------------------------------- staging state


@dataclass
class _Complete:
    repo: str
    commit: str
    expected: tuple[str, str]
    digest: FileDigest
    mtime_ns: int

    def to_json(self) -> dict:
        return {
            "repo": self.repo,
            "commit": self.commit,
            "expected": list(self.expected),
            "size": self.digest.size,
            "sha256": self.digest.sha256,
            "shards": list(self.digest.shards),
            "mtime_ns": self.mtime_ns,
        }

    @classmethod
    def from_json(cls, data: dict) -> _Complete:
        digest = FileDigest(int(data["size"]), str(data["sha256"]), tuple(str(s) for s in data["shards"]))
        expected = (str(data["expected"][0]), str(data["expected"][1]))
        if expected[0] == "sha256" and expected[1] != digest.sha256:
            raise ValueError("a checked file whose SHA-256 is not the published one")  # not a state fetch writes
        return cls(str(data["repo"]), str(data["commit"]), expected, digest, int(data["mtime_ns"]))


@dataclass
class _State:
    complete: dict[str, _Complete] = field(default_factory=dict)
    partial: dict[str, dict] = field(default_factory=dict)  # path -> {"repo", "commit", "expected", "size"}

    @classmethod
    def read(cls, path: Path) -> _State:
        """The state a previous run left; anything unreadable counts as no state (the files are re-fetched)."""
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
                return cls()
            complete = {p: _Complete.from_json(v) for p, v in data["complete"].items()}
            return cls(complete, {p: dict(v) for p, v in data["partial"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return cls()

    def to_bytes(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "complete": {p: c.to_json() for p, c in sorted(self.complete.items())},
            "partial": dict(sorted(self.partial.items())),
        }
        return json.dumps(doc, indent=1).encode()


def _identity(f: RemoteFile) -> dict:
    return {"repo": f.repo, "commit": f.commit, "expected": list(f.expected), "size": f.size}


def _same_content(f: RemoteFile, expected, size: int) -> bool:
    """The same bytes, whatever commit listed them: the published digest and size are equal."""
    return list(expected) == list(f.expected) and size == f.size


def _complete_is_intact(root: Path, path: str, c: _Complete) -> bool:
    try:
        st = os.lstat(root / path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == c.digest.size and st.st_mtime_ns == c.mtime_ns


def staged_status(root: Path, plan: Plan, state: _State | None = None) -> dict[str, FileStatus]:
    """What a previous run left in the staging directory `root` (its `state`, read here unless given), changing nothing."""
    if state is None:
        state = _State.read(root / WORK_DIR / "state.json")
    status = {}
    for f in plan.files:
        c = state.complete.get(f.path)
        p = state.partial.get(f.path)
        if c and _same_content(f, c.expected, c.digest.size) and _complete_is_intact(root, f.path, c):
            status[f.path] = FileStatus("staged")
        elif p and _same_content(f, p.get("expected", ()), p.get("size", -1)):
            partial = root / WORK_DIR / "partial" / f.path
            kept = partial.stat().st_size if partial.is_file() and not partial.is_symlink() else 0
            status[f.path] = FileStatus("partial", kept) if 0 < kept <= f.size else FileStatus("download")
        else:
            status[f.path] = FileStatus("download")
    return status


class _Staging:
    """Fetch's bookkeeping inside a StagedBundle directory, under an exclusive lock."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / WORK_DIR
        self.partials = self.work / "partial"
        self.state_path = self.work / "state.json"
        self.lock = threading.Lock()
        self.state = _State()
        self._lock = HeldLock(self.work / "lock", f"another sovpack fetch is writing {self.root}; wait for it to finish")

    def __enter__(self) -> _Staging:
        self.partials.mkdir(parents=True, exist_ok=True)
        self._lock.__enter__()
        self.state = _State.read(self.state_path)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__()

    @property
    def complete(self) -> dict[str, _Complete]:
        return self.state.complete

    def reconcile(self, plan: Plan) -> dict[str, FileStatus]:
        """Keep what a previous run checked and what it half-downloaded, when still wanted; delete the rest."""
        status = staged_status(self.root, plan, self.state)
        wanted = {f.path: f for f in plan.files}
        self.state.complete = {p: c for p, c in self.state.complete.items() if p in wanted and status[p].state == "staged"}
        self.state.partial = {p: _identity(wanted[p]) for p in wanted if status[p].state == "partial"}
        _prune(self.root, keep=set(self.state.complete), skip=WORK_DIR)
        _prune(self.partials, keep=set(self.state.partial), skip=None)
        self._save()
        return status

    def partial_path(self, path: str) -> Path:
        return self.partials / path

    def record_partial(self, f: RemoteFile) -> None:
        with self.lock:
            self.state.partial[f.path] = _identity(f)
            self._save()

    def record_complete(self, f: RemoteFile, digest: FileDigest) -> None:
        mtime_ns = os.lstat(self.root / f.path).st_mtime_ns
        with self.lock:
            self.state.partial.pop(f.path, None)
            self.state.complete[f.path] = _Complete(f.repo, f.commit, f.expected, digest, mtime_ns)
            self._save()

    def _save(self) -> None:
        write_atomically(self.state_path, self.state.to_bytes())


def _prune(root: Path, keep: set[str], skip: str | None, prefix: str = "") -> bool:
    """Delete every file under `root` whose relative path is not in `keep`, and the folders left empty.

    Symbolic links and special files are deleted too (the staging directory only ever holds regular
    files fetch wrote). Returns whether `root` is empty afterwards.
    """
    empty = True
    for entry in os.scandir(root):
        rel = prefix + entry.name
        if skip and rel == skip:
            empty = False
        elif entry.is_dir(follow_symlinks=False):
            if _prune(Path(entry.path), keep, None, rel + "/"):
                os.rmdir(entry.path)
            else:
                empty = False
        elif rel in keep and entry.is_file(follow_symlinks=False):
            empty = False
        else:
            os.unlink(entry.path)
    return empty
