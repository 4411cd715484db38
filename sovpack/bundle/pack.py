"""Build a bundle: stage files in a temporary directory, describe them, publish by rename.

`pack` turns a local model directory into an unsigned bundle. `file_entry` and
`StagedBundle` are shared with fetch and quantize, which produce bundles the same way.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack import __version__
from sovpack.bundle.directory import write_metadata
from sovpack.bundle.metadata import RESERVED_NAMES, BundleMetadata, FileEntry, check_allowances, check_inventory_paths, check_name
from sovpack.common.hashing import SHARD_SIZE, FileDigest, cpu_count, digest_file
from sovpack.common.safepath import unsafe_reason
from sovpack.errors import Failure, Refused, UsageError
from sovpack.formats import allowance_for, examine, role_of

GIT_METADATA = (".git", ".gitattributes", ".gitignore", ".github")


def file_entry(path: Path, rel: str, digest: FileDigest, source: dict | None = None, allowances: list[str] = ()) -> FileEntry:
    """Describe one staged file: it passes the file-kind gate (formats/gate.py), then role, format, what its inspector finds."""
    examined = examine(path, rel, allowances)
    role = role_of(rel, examined.format)
    return FileEntry(rel, digest.size, digest.sha256, digest.shards, role, examined.format, examined.details, source)


class StagedBundle:
    """A bundle being built in `<out>.partial`, published to `out` by one rename."""

    def __init__(self, out: Path, *, resume: bool = False):
        if out.exists():
            raise UsageError(f"{out} already exists; choose a new --out directory")
        self.out = out
        self.dir = self.staging_dir(out)
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def staging_dir(out: Path) -> Path:
        """Where the bundle `out` is built: its hidden sibling `.<name>.partial`."""
        return out.with_name(f".{out.name}.partial")

    def publish(self, metadata: BundleMetadata) -> None:
        check_inventory_paths([f.path for f in metadata.files])
        write_metadata(self.dir, metadata)
        os.replace(self.dir, self.out)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class SourceFile:
    rel: str
    path: Path
    size: int


def collect_source_files(src: Path) -> tuple[list[SourceFile], list[str]]:
    """Regular files under `src` (file symlinks followed), and the git metadata skipped."""
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            if Path(dirpath, d).is_symlink():
                raise Refused(f"{prefix}{d} in {src} is a symbolic link to a directory; copy the files instead")
            if d in GIT_METADATA:
                dirnames.remove(d)
                skipped.append(prefix + d + "/")
        for f in sorted(filenames):
            rel = prefix + f
            if f in GIT_METADATA:
                skipped.append(rel)
                continue
            found.append(_source_file(src, rel))
    return sorted(found, key=lambda s: s.rel), skipped


def _source_file(src: Path, rel: str) -> SourceFile:
    reason = unsafe_reason(rel)
    if reason:
        raise Refused(f"{rel} in {src} cannot go into a bundle: {reason}")
    if rel.split("/")[0] in RESERVED_NAMES:
        raise Refused(f"{rel} in {src} uses a name reserved for sovpack's own files")
    path = src / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        raise Refused(f"{rel} in {src} is a broken symbolic link") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{rel} in {src} is not a regular file")
    return SourceFile(rel, path, st.st_size)


def _place(source: Path, target: Path) -> None:
    """Hard-link when the filesystem allows, copy otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), target)
    except OSError:
        shutil.copyfile(source, target)


def pack(
    src: Path,
    out: Path,
    name: str,
    *,
    version: int = 1,
    expires: datetime | None = None,
    now: datetime | None = None,
    on_file: Callable[[str], None] | None = None,
    allowances: Sequence[str] = (),
) -> tuple[BundleMetadata, list[str]]:
    """Pack `src` into a new unsigned bundle at `out`; returns its metadata and the skipped paths.

    `allowances` (--allow-file) are globs of bundle paths that may hold files of no kind sovpack
    checks, or Python wheels; each must match a file. They are recorded in the signed metadata;
    pickles stay refused (except as members of an allowed wheel, formats/gate.py).

    Raises: UsageError (a bad name, version, expiry or allowance, one that matches no file, `out`
    exists, nothing to pack), Refused (a file the file-kind gate refuses, a pickle whatever the
    allowance, an unsafe path or link), Failure (I/O). Nothing is left at `out` on failure.
    """
    check_name(name, UsageError)
    if version < 1:
        raise UsageError(f"--version must be 1 or more, got {version}")
    files, skipped = collect_source_files(src)
    if not files:
        raise UsageError(f"{src} holds no files to pack")
    allowances = check_allowances(list(allowances))
    for glob in allowances:
        if not any(allowance_for(f.rel, [glob]) for f in files):
            raise UsageError(f"--allow-file {glob!r} matches no file in {src} (globs match the whole path, e.g. 'onnx/*.onnx')")
    for f in files:  # the gate, before copying anything
        examine(f.path, f.rel, allowances)
    staged = StagedBundle(out)
    try:
        entries = _stage_files(staged.dir, files, on_file, allowances)
        metadata = BundleMetadata(
            name=name,
            version=version,
            created=now or datetime.now(timezone.utc),
            expires=expires,
            created_by=f"sovpack {__version__}",
            shard_size=SHARD_SIZE,
            files=entries,
            allowed_files=allowances,
        )
        staged.publish(metadata)
    except BaseException:
        staged.discard()
        raise
    return metadata, skipped


def _stage_files(staging: Path, files: list[SourceFile], on_file, allowances: list[str]) -> list[FileEntry]:
    def stage(f: SourceFile) -> FileEntry:
        target = staging / f.rel
        try:
            _place(f.path, target)
        except OSError as e:
            raise Failure(f"cannot copy {f.rel} into the bundle: {e.strerror}") from None
        entry = file_entry(target, f.rel, digest_file(target), {"type": "local"}, allowances)
        if on_file:
            on_file(f.rel)
        return entry

    with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
        return list(pool.map(stage, sorted(files, key=lambda f: -f.size)))
