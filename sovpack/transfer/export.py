"""Export: a signed bundle written as volumes for media, or as one stream for a data diode.

The bundle is checked first (signed, unexpired, its inventory and file sizes as listed), then
each file is read once: its bytes go into the tar stream, cut into volumes each hashed on a
thread of its own, and to the shard hasher of a second thread, which compares the file with
its signed shard digests as it ends. A file that does not match stops the export and removes
what was written; the index, written last, is what makes an export complete. Nothing is read
twice and memory stays flat.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from sovpack import __version__
from sovpack.bundle.directory import read_metadata_bytes, require_bundle_dir, scan_tree
from sovpack.bundle.metadata import METADATA_FILE, BundleMetadata, FileEntry, format_time, parse_metadata
from sovpack.bundle.signature import read_statement
from sovpack.bundle.verify import check_digests, check_expiry, check_inventory, check_sizes, digest_failure
from sovpack.common.files import require_free_space, write_atomically
from sovpack.common.hashing import ShardHasher, compare_shards
from sovpack.common.pipeline import Lane
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused, UsageError
from sovpack.transfer.archive import ArchivePlan, plan_archive, write_archive
from sovpack.transfer.index import (
    DEFAULT_VOLUME_SIZE,
    BundleIdentity,
    ExportIndex,
    FileRef,
    VolumeEntry,
    find_index,
    index_name,
    index_signature_name,
    read_index,
    sign_index,
    volume_stem,
)
from sovpack.transfer.media import StreamWriter, VolumeWriter


@dataclass
class ExportResult:
    identity: BundleIdentity
    archive_size: int
    left_out: list[FileRef]
    volumes: list[VolumeEntry]
    index_path: Path | None = None
    signature_path: Path | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Checked:
    root: Path
    metadata: BundleMetadata
    identity: BundleIdentity
    signatures: list[str]
    warnings: tuple[str, ...]


def check_exportable(root: Path, now: datetime | None = None) -> _Checked:
    """Refuse a bundle the secure side would refuse anyway: unsigned, expired, or not matching its inventory.

    The files' bytes are checked as they are exported (_DigestCheck), not here.
    """
    require_bundle_dir(root)
    raw = read_metadata_bytes(root)
    metadata = parse_metadata(raw)
    identity = BundleIdentity.of(metadata, raw)
    tree = scan_tree(root)
    covering, stale = _signatures_covering(root, tree.signatures, identity.metadata_sha256)
    if not covering:
        why = (
            "it has no signature"
            if not tree.signatures
            else f"no signature covers its {METADATA_FILE} ({', '.join(stale)} are stale)"
        )
        raise Refused(f"refusing to export {root}: {why}; run `sovpack sign {root} --key KEYFILE` first")
    try:
        check_expiry(metadata, now or datetime.now(timezone.utc))
        check_inventory(metadata, tree, root)
        check_sizes(root, metadata.files)
    except Refused as e:
        raise Refused(f"refusing to export {root}: {e}") from None
    warnings = tuple(
        f"{s} does not cover this {METADATA_FILE} (signed before the bundle changed); it is exported but will not count"
        for s in stale
    )
    return _Checked(root, metadata, identity, tree.signatures, warnings)


def _signatures_covering(root: Path, signatures: list[str], metadata_sha256: str) -> tuple[list[str], list[str]]:
    covering, stale = [], []
    for name in signatures:
        try:
            statement = read_statement(root / name, name)
        except Refused as e:
            raise Refused(f"refusing to export {root}: {e}") from None
        (covering if statement.covers(metadata_sha256) else stale).append(name)
    return covering, stale


def held_digests(since: Path) -> tuple[set[str], dict]:
    """The SHA-256 of every file the secure side holds after importing `since` (an index or a bundle)."""
    if (since / METADATA_FILE).is_file():
        raw = read_metadata_bytes(since)
        metadata = parse_metadata(raw)
        return {f.sha256 for f in metadata.files}, BundleIdentity.of(metadata, raw).to_json() | {"from": "bundle"}
    index, _ = read_index(
        find_index(since, "give --since the index file (*.index.json) of an earlier export, or the earlier bundle directory")
    )
    return {f.sha256 for f in index.files}, index.bundle.to_json() | {"from": "index"}


def _plan(checked: _Checked, since: Path | None) -> tuple[ArchivePlan, list[FileRef], dict | None]:
    held, since_doc = held_digests(since) if since else (set(), None)
    left_out = [FileRef(f.path, f.size, f.sha256) for f in checked.metadata.files if f.sha256 in held]
    plan = plan_archive(checked.root, checked.metadata, checked.signatures, {f.path for f in left_out})
    return plan, left_out, since_doc


def _check_left_out(checked: _Checked, left_out: list[FileRef], progress: Progress) -> None:
    """Files a delta export leaves out are not in the stream: their digests are checked from disk, on all cores."""
    if not left_out:
        return
    progress.phase("checking files left out", sum(f.size for f in left_out))
    try:
        check_digests(checked.root, checked.metadata, [f.path for f in left_out], on_progress=progress.advance)
    except Refused as e:
        raise Refused(f"refusing to export {checked.root}: {e}") from None


class _DigestCheck:
    """Each exported file against its signed shard digests, hashed on a thread of its own from the bytes being exported.

    A file's verdict is known shortly after its last byte was read; the first file that does
    not match is raised at the start of the next file, or by `wait`, in stream order.
    """

    def __init__(self, checked: _Checked):
        self.root = checked.root
        self.entries = {f.path: f for f in checked.metadata.files}
        self.shard_size = checked.metadata.shard_size
        self.lane = Lane("export-check")
        self.verdicts: deque[Future] = deque()

    def on_file(self, path: str) -> _FileCheck | None:
        self._raise_failure(wait=False)
        entry = self.entries.get(path)
        return _FileCheck(self, entry) if entry else None  # sovpack.json and signatures: checked by check_exportable

    def judge(self, entry: FileEntry, hasher: ShardHasher) -> None:
        self.verdicts.append(self.lane.submit(self._compare, entry, hasher))

    def _compare(self, entry: FileEntry, hasher: ShardHasher) -> None:
        expected = entry.digest
        mismatch = compare_shards(entry.path, expected, hasher.finish(), self.shard_size)
        if mismatch:
            raise Refused(f"refusing to export {self.root}: {digest_failure([mismatch])}")

    def wait(self) -> None:
        """Every file checked: raise the first that does not match."""
        self._raise_failure(wait=True)

    def _raise_failure(self, *, wait: bool) -> None:
        while self.verdicts and (wait or self.verdicts[0].done()):  # in stream order, as the lane decides them
            self.verdicts.popleft().result()

    def close(self) -> None:
        self.lane.close(cancel=True)


class _FileCheck:
    """The shard hasher of one file being exported (archive.FileFeed)."""

    def __init__(self, check: _DigestCheck, entry: FileEntry):
        self.check, self.entry, self.hasher = check, entry, ShardHasher(check.shard_size)

    def update(self, chunk: memoryview) -> Future:
        return self.check.lane.submit(self.hasher.update, chunk)

    def close(self) -> None:
        self.check.judge(self.entry, self.hasher)


def export_volumes(
    root: Path,
    to: Path,
    *,
    volume_size: int = DEFAULT_VOLUME_SIZE,
    private_key=None,
    since: Path | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
) -> ExportResult:
    """Write the signed bundle at `root` as volumes of at most `volume_size` bytes, and their index, into `to`.

    Raises: UsageError (a bad destination, an earlier export there, a bad --since), Refused (the bundle
    is unsigned, expired, or does not match its inventory), Failure (I/O, a full destination). What was
    written is removed on failure.
    """
    progress = progress or Progress()
    checked = check_exportable(root, now)
    plan, left_out, since_doc = _plan(checked, since)
    _check_left_out(checked, left_out, progress)
    stem = checked.identity.stem
    _prepare_destination(to, stem, plan.size, volume_size)
    writer = VolumeWriter(to, stem, volume_size, progress)
    check = _DigestCheck(checked)
    index_path, signature_path = to / index_name(stem), to / index_signature_name(stem)
    progress.phase("writing volumes", plan.size)
    try:
        write_archive(plan, writer, check.on_file)
        check.wait()  # before anything that makes the export look complete
        volumes = writer.close()
        index = ExportIndex(
            bundle=checked.identity,
            archive_size=writer.tell(),
            volume_size=volume_size,
            volumes=volumes,
            files=[FileRef(f.path, f.size, f.sha256) for f in sorted(checked.metadata.files, key=lambda f: f.path)],
            left_out=left_out,
            since=since_doc,
            created=format_time(now or datetime.now(timezone.utc)),
            created_by=f"sovpack {__version__}",
        )
        raw_index = index.to_bytes()
        if private_key is not None:
            write_atomically(signature_path, sign_index(private_key, index, raw_index))
        write_atomically(index_path, raw_index)  # last: volumes without their index are an unfinished export
    except BaseException:
        check.close()
        writer.abort()
        signature_path.unlink(missing_ok=True)
        raise
    check.close()
    return ExportResult(
        checked.identity,
        index.archive_size,
        left_out,
        volumes,
        index_path,
        signature_path if private_key is not None else None,
        checked.warnings,
    )


def _prepare_destination(to: Path, stem: str, archive_size: int, volume_size: int) -> None:
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Failure(f"cannot create the export directory {to}: {e.strerror}") from None
    if (to / index_name(stem)).exists():
        raise UsageError(
            f"{to} already holds an export of {stem} ({index_name(stem)}); choose an empty directory or remove it first"
        )
    for p in to.iterdir():  # volumes of an interrupted export into this directory (it has no index)
        if volume_stem(p.name) == stem and p.is_file():
            p.unlink()
    count = -(-archive_size // volume_size)
    require_free_space(
        to,
        archive_size,
        lambda free: (
            f"{to} has {free} bytes free but the export of {stem} needs {archive_size} bytes ({count} volume(s) of "
            f"at most {volume_size} bytes); export to a larger disk and copy the volumes onto several media"
        ),
    )


def export_stream(
    root: Path, stream: BinaryIO, *, since: Path | None = None, progress: Progress | None = None, now: datetime | None = None
) -> ExportResult:
    """The same tar stream as the volumes, written to `stream` (a data diode, a pipe).

    A file found not to match its digests stops the stream where it is: the receiving import
    refuses a stream cut short, or that file.
    """
    progress = progress or Progress()
    checked = check_exportable(root, now)
    plan, left_out, _ = _plan(checked, since)
    _check_left_out(checked, left_out, progress)
    progress.phase("writing the stream", plan.size)
    writer = StreamWriter(stream, progress)
    check = _DigestCheck(checked)
    try:
        write_archive(plan, writer, check.on_file)
        writer.close()
        check.wait()
    except BrokenPipeError:
        raise Failure("the receiving end closed the stream before the export finished") from None
    finally:
        check.close()
    return ExportResult(checked.identity, writer.tell(), left_out, [], warnings=checked.warnings)
