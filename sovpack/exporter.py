"""Export: a signed bundle written as volumes for media, or as one stream for a data diode.

The bundle is checked first (signed, unexpired, every file matching its inventory), then
read once into a tar stream that is cut into volumes while it is hashed; the index, written
last, is what makes the export complete. Nothing is copied twice and memory stays flat.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from sovpack import __version__
from sovpack.archive import ArchivePlan, plan_archive, write_archive
from sovpack.bundle import read_metadata_bytes, require_bundle_dir, scan_tree, write_atomically
from sovpack.errors import Failure, Refused, UsageError
from sovpack.hashing import sha256_bytes
from sovpack.metadata import METADATA_FILE, BundleMetadata, format_time, parse_metadata
from sovpack.progress import Progress
from sovpack.signature import parse_signature, parse_statement
from sovpack.verify import check_digests, check_expiry, check_inventory
from sovpack.volume_io import StreamWriter, VolumeWriter
from sovpack.volumes import (
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
)


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


def check_exportable(root: Path, progress: Progress, now: datetime | None = None) -> _Checked:
    """Refuse a bundle the secure side would refuse anyway: unsigned, expired, or not matching its inventory."""
    require_bundle_dir(root)
    raw = read_metadata_bytes(root)
    metadata = parse_metadata(raw)
    metadata_sha256 = sha256_bytes(raw)
    tree = scan_tree(root)
    covering, stale = _signatures_covering(root, tree.signatures, metadata_sha256)
    if not covering:
        why = "it has no signature" if not tree.signatures else f"no signature covers its {METADATA_FILE} ({', '.join(stale)} are stale)"
        raise Refused(f"refusing to export {root}: {why}; run `sovpack sign {root} --key KEYFILE` first")
    try:
        check_expiry(metadata, now or datetime.now(timezone.utc))
        check_inventory(metadata, tree, root)
        progress.phase("checking the bundle", sum(f.size for f in metadata.files))
        check_digests(root, metadata, on_progress=progress.advance)
    except Refused as e:
        raise Refused(f"refusing to export {root}: {e}") from None
    identity = BundleIdentity(metadata.name, metadata.version, metadata_sha256, format_time(metadata.created),
                              format_time(metadata.expires) if metadata.expires else None,
                              sum(f.size for f in metadata.files))  # fmt: skip
    warnings = tuple(f"{s} does not cover this {METADATA_FILE} (signed before the bundle changed); it is exported but will not count" for s in stale)
    return _Checked(root, metadata, identity, tree.signatures, warnings)


def _signatures_covering(root: Path, signatures: list[str], metadata_sha256: str) -> tuple[list[str], list[str]]:
    covering, stale = [], []
    for name in signatures:
        try:
            statement = parse_statement(parse_signature((root / name).read_bytes(), name).payload, name)
        except Refused as e:
            raise Refused(f"refusing to export {root}: {e}") from None
        (covering if statement.resources.get(METADATA_FILE) == metadata_sha256 else stale).append(name)
    return covering, stale


def held_digests(since: Path) -> tuple[set[str], dict]:
    """The SHA-256 of every file the secure side holds after importing `since` (an index or a bundle)."""
    if since.is_dir():
        require_bundle_dir(since)
        raw = read_metadata_bytes(since)
        metadata = parse_metadata(raw)
        return {f.sha256 for f in metadata.files}, {"name": metadata.name, "version": metadata.version, "metadata_sha256": sha256_bytes(raw)}
    if since.is_file() or since.suffix == ".json":
        index, _ = read_index(find_index(since))
        return {f.sha256 for f in index.files}, index.bundle.to_json() | {"from": "index"}
    raise UsageError(f"--since {since}: give the index file (*.index.json) of an earlier export, or the earlier bundle directory")


def _plan(checked: _Checked, since: Path | None) -> tuple[ArchivePlan, list[FileRef], dict | None]:
    held, since_doc = held_digests(since) if since else (set(), None)
    left_out = [FileRef(f.path, f.size, f.sha256) for f in checked.metadata.files if f.sha256 in held]
    plan = plan_archive(checked.root, checked.metadata, checked.signatures, {f.path for f in left_out})
    return plan, left_out, since_doc


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
    progress = progress or Progress()
    checked = check_exportable(root, progress, now)
    plan, left_out, since_doc = _plan(checked, since)
    stem = checked.identity.stem
    _prepare_destination(to, stem, plan.size, volume_size)
    writer = VolumeWriter(to, stem, volume_size, progress)
    index_path, signature_path = to / index_name(stem), to / index_signature_name(stem)
    progress.phase("writing volumes", plan.size)
    try:
        write_archive(plan, writer)
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
        writer.abort()
        signature_path.unlink(missing_ok=True)
        raise
    return ExportResult(checked.identity, index.archive_size, left_out, volumes, index_path,
                        signature_path if private_key is not None else None, checked.warnings)  # fmt: skip


def _prepare_destination(to: Path, stem: str, archive_size: int, volume_size: int) -> None:
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Failure(f"cannot create the export directory {to}: {e.strerror}") from None
    if (to / index_name(stem)).exists():
        raise UsageError(f"{to} already holds an export of {stem} ({index_name(stem)}); choose an empty directory or remove it first")
    leftover = re.compile(re.escape(stem) + r"\.[0-9]{3,}")
    for p in to.iterdir():  # volumes of an interrupted export into this directory (it has no index)
        if leftover.fullmatch(p.name) and p.is_file():
            p.unlink()
    free = shutil.disk_usage(to).free
    if free < archive_size:
        count = -(-archive_size // volume_size)
        raise Failure(f"{to} has {free} bytes free but the export of {stem} needs {archive_size} bytes ({count} volume(s) of "
                      f"at most {volume_size} bytes); export to a larger disk and copy the volumes onto several media")  # fmt: skip


def export_stream(root: Path, stream: BinaryIO, *, since: Path | None = None, progress: Progress | None = None,
                  now: datetime | None = None) -> ExportResult:  # fmt: skip
    """The same tar stream as the volumes, written to `stream` (a data diode, a pipe)."""
    progress = progress or Progress()
    checked = check_exportable(root, progress, now)
    plan, left_out, _ = _plan(checked, since)
    progress.phase("writing the stream", plan.size)
    writer = StreamWriter(stream, progress)
    try:
        write_archive(plan, writer)
        stream.flush()
    except BrokenPipeError:
        raise Failure("the receiving end closed the stream before the export finished") from None
    return ExportResult(checked.identity, writer.tell(), left_out, [], warnings=checked.warnings)
