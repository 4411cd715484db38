"""A bundle on disk: the directory, its metadata file, its signature files."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.metadata import MAX_METADATA_BYTES, METADATA_FILE, SIGNATURES_DIR, BundleMetadata, parse_metadata
from sovpack.common.files import write_atomically
from sovpack.common.safepath import unsafe_reason
from sovpack.errors import Failure, Refused, UsageError

SIGNATURE_SUFFIX = ".sig"


@dataclass(frozen=True)
class Tree:
    """What is really in a bundle directory."""

    files: list[str]  # regular files outside signatures/, as relative POSIX paths
    signatures: list[str]  # regular *.sig files directly in signatures/


def require_bundle_dir(root: Path) -> None:
    if not root.is_dir():
        raise UsageError(f"{root} is not a bundle directory")
    if not (root / METADATA_FILE).is_file():
        raise UsageError(f"{root} is not a sovpack bundle: it has no {METADATA_FILE}")


def read_metadata_bytes(root: Path) -> bytes:
    path = root / METADATA_FILE
    if path.is_symlink() or not path.is_file():
        raise Refused(f"{METADATA_FILE} is missing or not a regular file")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise Refused(f"{METADATA_FILE} is larger than {MAX_METADATA_BYTES} bytes")
    return path.read_bytes()


def read_metadata(root: Path) -> BundleMetadata:
    return parse_metadata(read_metadata_bytes(root))


def is_signature_path(rel: str) -> bool:
    """What may live in signatures/: *.sig files directly in it (`rel` is a path inside the bundle)."""
    directory, _, name = rel.partition("/")
    return directory == SIGNATURES_DIR and "/" not in name and name.endswith(SIGNATURE_SUFFIX)


def scan_tree(root: Path) -> Tree:
    """Every entry under `root`, refusing symlinks, device files and unsafe names."""
    files, signatures = [], []
    for rel in _walk(root, ""):
        if rel.split("/")[0] == SIGNATURES_DIR:
            if not is_signature_path(rel):
                raise Refused(f"{rel} does not belong in {SIGNATURES_DIR}/, which holds only *{SIGNATURE_SUFFIX} files")
            signatures.append(rel)
        else:
            files.append(rel)
    return Tree(sorted(files), sorted(signatures))


def _walk(root: Path, prefix: str):
    try:
        entries = sorted(os.scandir(root / prefix if prefix else root), key=lambda e: e.name)
    except OSError as e:
        raise Failure(f"cannot read directory {root / prefix}: {e.strerror}") from None
    if not entries and prefix and prefix != SIGNATURES_DIR + "/":  # not in the inventory, so nothing could vouch for it
        raise Refused(f"{prefix} is an empty directory; bundles hold only the files their inventory lists")
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        reason = unsafe_reason(rel)
        if reason:
            raise Refused(f"unsafe file name {rel!r} in the bundle: {reason}")
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            raise Refused(f"{rel} is a symbolic link; bundles may hold only regular files")
        if stat.S_ISDIR(mode):
            yield from _walk(root, rel + "/")
        elif stat.S_ISREG(mode):
            yield rel
        else:
            raise Refused(f"{rel} is a device, socket or pipe; bundles may hold only regular files")


def write_metadata(root: Path, metadata: BundleMetadata) -> bytes:
    data = metadata.to_bytes()
    write_atomically(root / METADATA_FILE, data, tmp_dir=root.resolve().parent)
    return data


def signature_path(root: Path, key_id: str) -> Path:
    return root / SIGNATURES_DIR / f"{key_id}{SIGNATURE_SUFFIX}"
