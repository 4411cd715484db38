"""Volumes checked on their own against the index: size and SHA-256 (what `sha256sum` prints), several at once.

`check-volumes` runs this before anything else; import checks the same volumes while it reads
them once as one stream (stream_check.py), and both share the verdicts below. A journal of the
volumes found intact lets a re-run skip them.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sovpack.bundle.trust import TrustPolicy
from sovpack.common.files import write_atomically
from sovpack.common.hashing import READ_SIZE, cpu_count
from sovpack.common.progress import Progress
from sovpack.transfer.index import (
    INDEX_SIGNATURE_SUFFIX,
    INDEX_SUFFIX,
    ExportIndex,
    VolumeEntry,
    check_index_signature,
    index_name,
    index_signature_name,
    read_index,
    volume_stem,
)

VolumeState = Literal["ok", "reused", "damaged", "missing"]  # reused: ok in an earlier run, unchanged since


@dataclass(frozen=True)
class VolumeStatus:
    file: str
    state: VolumeState
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "reused")


@dataclass
class VolumeReport:
    index_path: Path
    index: ExportIndex
    signature: str
    volumes: list[VolumeStatus]
    foreign: list[str]  # files of other exports found in the same directory

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.volumes)

    def failure_message(self) -> str:
        bad = [v for v in self.volumes if not v.ok]
        parts = [f"{v.file} {v.state}" + (f" ({v.detail})" if v.detail else "") for v in bad]
        message = (
            f"{len(bad)} of {len(self.volumes)} volume(s) of {self.index.bundle.label} cannot be used: "
            + "; ".join(parts)
            + ". Copy or burn them again from the export"
        )
        if self.foreign:
            message += f"; this directory also holds files of another export, not used: {', '.join(self.foreign)}"
        return message


class CheckJournal:
    """Volumes already found intact, keyed by what their file system says of them.

    A volume is read again only if its size, inode, modification or change time differs.
    Skipping is safe: the volume check only locates bad media early; the full verification
    of the reassembled bundle is what decides.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries: dict = json.loads(path.read_bytes()) if path.is_file() else {}
        except ValueError:
            self.entries = {}

    @staticmethod
    def _identity(path: Path, expected_sha256: str) -> list:
        st = path.stat()
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected_sha256]

    def seen(self, path: Path, expected_sha256: str) -> bool:
        return self.entries.get(path.name) == self._identity(path, expected_sha256)

    def record(self, path: Path, expected_sha256: str) -> None:
        self.entries[path.name] = self._identity(path, expected_sha256)
        self.save()

    def __getitem__(self, key: str):
        return self.entries.get(key)

    def __setitem__(self, key: str, value) -> None:
        self.entries[key] = value
        self.save()

    def discard(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.save()

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, json.dumps(self.entries).encode())
        except OSError:
            pass  # the journal only saves work on a re-run; a full disk is reported by what needs the space


def check_volumes(
    index_path: Path,
    policy: TrustPolicy | None = None,
    *,
    journal: CheckJournal | None = None,
    progress: Progress | None = None,
) -> VolumeReport:
    """Check every volume against the index on its own, several at once, before any reassembly.

    Damaged and missing volumes are in the report, not raised. Raises: Refused (an index that is
    malformed, or whose signature is by a key `policy` does not trust or does not match), Failure (I/O).
    """
    index, raw = read_index(index_path)
    signature = check_index_signature(index_path.parent, index, raw, policy)
    return check_index_volumes(index_path, index, signature, journal=journal, progress=progress)


def check_index_volumes(
    index_path: Path,
    index: ExportIndex,
    signature: str,
    *,
    journal: CheckJournal | None = None,
    progress: Progress | None = None,
) -> VolumeReport:
    """check_volumes of an index already read, whose signature `signature` describes.

    What the file system tells (missing, wrong size, intact in an earlier run) is known first;
    only the other volumes are read.
    """
    progress = progress or Progress()
    directory = index_path.parent
    known = [status_without_reading(directory / v.file, v, journal) for v in index.volumes]
    progress.phase("checking volumes", sum(v.size for v, status in zip(index.volumes, known, strict=True) if status is None))
    journal_lock = threading.Lock()

    def check(entry: VolumeEntry, status: VolumeStatus | None) -> VolumeStatus:
        if status is not None:
            return status
        status = _read_volume(directory / entry.file, entry, progress)
        if journal and status.state == "ok":
            with journal_lock:
                journal.record(directory / entry.file, entry.sha256)
        return status

    statuses = []
    with ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="check-volume") as pool:
        for status in pool.map(check, index.volumes, known):  # in volume order, as each is known
            progress.volume(status)
            statuses.append(status)
    return VolumeReport(index_path, index, signature, statuses, foreign_files(directory, index))


def status_without_reading(path: Path, entry: VolumeEntry, journal: CheckJournal | None) -> VolumeStatus | None:
    """What the file system alone tells of a volume: missing, of the wrong size, or intact in an earlier run."""
    if not path.is_file():
        return VolumeStatus(entry.file, "missing", "not in the directory")
    if journal and journal.seen(path, entry.sha256):
        return VolumeStatus(entry.file, "reused", "intact in an earlier run and unchanged since: not read again")
    size = path.stat().st_size
    if size != entry.size:
        return VolumeStatus(entry.file, "damaged", f"{size} bytes, the index says {entry.size}")
    return None


def verdict(entry: VolumeEntry, size: int, sha256: str) -> VolumeStatus:
    """A volume read in full: `size` bytes with SHA-256 `sha256`, against the index."""
    if size != entry.size:
        return VolumeStatus(entry.file, "damaged", f"{size} bytes, the index says {entry.size}")
    if sha256 != entry.sha256:
        return VolumeStatus(entry.file, "damaged", f"its SHA-256 is {sha256}, the index says {entry.sha256}")
    return VolumeStatus(entry.file, "ok")


def unreadable(entry: VolumeEntry, error: OSError) -> VolumeStatus:
    return VolumeStatus(entry.file, "damaged", f"unreadable: {error.strerror or error}")


def _read_volume(path: Path, entry: VolumeEntry, progress: Progress) -> VolumeStatus:
    try:
        return verdict(entry, *_sha256_with_progress(path, progress))
    except OSError as e:
        return unreadable(entry, e)


def _sha256_with_progress(path: Path, progress: Progress) -> tuple[int, str]:
    digest = hashlib.sha256()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            progress.advance(n)
            size += n
    return size, digest.hexdigest()


def foreign_files(directory: Path, index: ExportIndex) -> list[str]:
    """Volumes and indexes in `directory` that belong to another export."""
    ours = {v.file for v in index.volumes} | {index_name(index.bundle.stem), index_signature_name(index.bundle.stem)}
    found = []
    for p in sorted(directory.iterdir()):
        stem = volume_stem(p.name)
        if p.name in ours or not (stem or p.name.endswith((INDEX_SUFFIX, INDEX_SIGNATURE_SUFFIX))):
            continue
        stem = stem or p.name.removesuffix(INDEX_SUFFIX).removesuffix(INDEX_SIGNATURE_SUFFIX)
        found.append(p.name + (f" (of {stem})" if stem != index.bundle.stem else " (not listed in this index)"))
    return found
