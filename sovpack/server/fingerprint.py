"""File identity, to close the gap between verifying a file and using it, and to skip re-hashing.

A Fingerprint is what the kernel says about a file: device, inode, size, mtime and ctime
(nanoseconds). Writing to a file or changing its mode moves its ctime, which no
unprivileged process can set back; replacing it changes the inode.

VerificationRecords is the optional fast path of `sovpack serve`: after a full
verification, the fingerprint of each read-only weights file is recorded with the signed
SHA-256 it was checked against (STORE/serve/verified.json). On the next start, a file
whose fingerprint and signed digest both still match is not re-hashed; signatures,
threshold, metadata, inventory, formats and expiry are still checked every time.
The record trusts the store's file permissions: whoever can write the store as its owner
could alter a file and the record together. `--full-verify` ignores the record.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack.bundle.metadata import format_time
from sovpack.common.files import write_atomically

RECORD_FILE = Path("serve") / "verified.json"


@dataclass(frozen=True)
class Fingerprint:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    read_only: bool

    @classmethod
    def of(cls, path: Path) -> Fingerprint:
        return cls._of(os.stat(path))

    @classmethod
    def of_fd(cls, fd: int) -> Fingerprint:
        return cls._of(os.fstat(fd))

    @classmethod
    def _of(cls, st: os.stat_result) -> Fingerprint:
        read_only = not stat.S_IMODE(st.st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, read_only)

    def same_contents_identity(self, other: Fingerprint) -> bool:
        """Same inode, size and mtime: not replaced, not written through the normal interfaces."""
        return (self.dev, self.ino, self.size, self.mtime_ns) == (other.dev, other.ino, other.size, other.mtime_ns)

    def same_file(self, other: Fingerprint) -> bool:
        """Also the same ctime: not even a hard link added, a chmod, or a write with mtime set back."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns) == (
            other.dev,
            other.ino,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )


def describe_change(before: Fingerprint, after: Fingerprint) -> str:
    """How a file whose contents identity moved (not `same_contents_identity`) changed."""
    if (before.dev, before.ino) != (after.dev, after.ino):
        return "it was replaced by another file"
    if before.size != after.size:
        return f"its size changed from {before.size} to {after.size} bytes"
    return "it was written to (mtime changed)"


class VerificationRecords:
    def __init__(self, store_root: Path):
        self.path = store_root / RECORD_FILE

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}}
        except (OSError, ValueError):
            return {"files": {}}

    def vouched(self, files: dict[Path, tuple[Fingerprint, str]]) -> set[Path]:
        """The files (path: fingerprint now, signed SHA-256) fully verified as that SHA-256 and
        unchanged and read-only since. The record is read once."""
        recorded = self._load()["files"]
        return {path for path, (now, sha256) in files.items() if _vouches(recorded.get(str(path.resolve())), now, sha256)}

    def remember(self, verified: dict[Path, tuple[Fingerprint, str]]) -> None:
        """Record read-only files just verified in full; writable ones are never recorded."""
        read_only = {path: item for path, item in verified.items() if item[0].read_only}
        if not read_only:
            return
        data = self._load()
        now = format_time(datetime.now(timezone.utc))
        for path, (fingerprint, sha256) in read_only.items():
            fields = {k: v for k, v in asdict(fingerprint).items() if k != "read_only"}
            data["files"][str(path.resolve())] = {**fields, "sha256": sha256, "verified": now}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)


def _vouches(entry, fingerprint: Fingerprint, sha256: str) -> bool:
    if not fingerprint.read_only or not isinstance(entry, dict) or entry.get("sha256") != sha256:
        return False
    recorded = {k: entry.get(k) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")}
    return recorded == {k: v for k, v in asdict(fingerprint).items() if k != "read_only"}
