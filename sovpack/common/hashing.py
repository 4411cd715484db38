"""SHA-256 digests of files: whole-file, and fixed-size shards checked on all cores.

A file's whole-file SHA-256 is what the Hub publishes and what the interoperable
signature statement carries; it can only be computed in one sequential pass. The shard
digests (one SHA-256 per `shard_size` piece) let verification spread a single large file
over every core. Both are produced in one read by `Digester`; `check_shards` verifies files
on disk, and `compare_shards` checks digests a `ShardHasher` computed from bytes as they
streamed past (export and import hash what they write instead of reading it again).
hashlib releases the GIL on large buffers, so plain threads use all cores.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterable

MIB = 1024 * 1024
SHARD_SIZE = 64 * MIB
READ_SIZE = 4 * MIB

_whole_file_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _overlap_pool() -> ThreadPoolExecutor:
    """Threads that run whole-file hashing beside shard hashing of the same bytes."""
    global _whole_file_pool
    with _pool_lock:
        if _whole_file_pool is None:
            _whole_file_pool = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="sha256")
        return _whole_file_pool


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    shards: tuple[str, ...]


@dataclass(frozen=True)
class ShardDigests:
    """The shard digests of bytes as they streamed past (no whole-file SHA-256)."""

    size: int
    shards: tuple[str, ...]


class ShardHasher:
    """One SHA-256 per `shard_size` piece of one byte stream, fed in order."""

    def __init__(self, shard_size: int = SHARD_SIZE):
        self.shard_size = shard_size
        self._shard = hashlib.sha256()
        self._shard_filled = 0
        self._shards: list[str] = []
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            take = min(len(view), self.shard_size - self._shard_filled)
            self._shard.update(view[:take])
            self._shard_filled += take
            view = view[take:]
            if self._shard_filled == self.shard_size:
                self._close_shard()

    def _close_shard(self) -> None:
        self._shards.append(self._shard.hexdigest())
        self._shard = hashlib.sha256()
        self._shard_filled = 0

    def finish(self) -> ShardDigests:
        if self._shard_filled or not self._shards:
            self._close_shard()
        return ShardDigests(self.size, tuple(self._shards))


class Digester:
    """Whole-file SHA-256 and shard digests of one byte stream, fed in order."""

    def __init__(self, shard_size: int = SHARD_SIZE):
        self._whole = hashlib.sha256()
        self._shards = ShardHasher(shard_size)

    @property
    def size(self) -> int:
        return self._shards.size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if len(view) >= MIB:
            pending = _overlap_pool().submit(self._whole.update, view)
            self._shards.update(view)
            pending.result()
        else:
            self._whole.update(view)
            self._shards.update(view)

    def finish(self) -> FileDigest:
        shards = self._shards.finish()
        return FileDigest(shards.size, self._whole.hexdigest(), shards.shards)


def digest_file(path: Path, shard_size: int = SHARD_SIZE) -> FileDigest:
    digester = Digester(shard_size)
    buffer = bytearray(READ_SIZE)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digester.update(memoryview(buffer)[:n])
    return digester.finish()


def shard_count(size: int, shard_size: int) -> int:
    return max(1, -(-size // shard_size))


@dataclass(frozen=True)
class ShardMismatch:
    path: str
    index: int
    offset: int


_thread_buffers = threading.local()


def _read_buffer() -> bytearray:
    buffer = getattr(_thread_buffers, "buffer", None)
    if buffer is None:
        buffer = _thread_buffers.buffer = bytearray(READ_SIZE)
    return buffer


def _shard_sha256(path: Path, offset: int, length: int) -> tuple[str, int]:
    """SHA-256 of `length` bytes at `offset`, and how many bytes were really there."""
    h = hashlib.sha256()
    buffer = _read_buffer()
    view = memoryview(buffer)
    seen = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while seen < length:
            n = f.readinto(view[: min(READ_SIZE, length - seen)])
            if not n:
                break
            h.update(view[:n])
            seen += n
    return h.hexdigest(), seen


@dataclass(frozen=True)
class ShardJob:
    name: str  # how the file is named in messages (its path inside the bundle)
    path: Path
    index: int
    offset: int
    length: int
    expected: str


def shard_jobs(name: str, path: Path, digest: FileDigest, shard_size: int) -> list[ShardJob]:
    return [
        ShardJob(name, path, i, i * shard_size, min(shard_size, digest.size - i * shard_size), expected)
        for i, expected in enumerate(digest.shards)
    ]


def check_shards(
    jobs: Iterable[ShardJob],
    *,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[ShardMismatch]:
    """Hash every shard on all cores; return the shards whose digest differs (empty when all match)."""
    jobs = sorted(jobs, key=lambda j: j.length, reverse=True)
    mismatches = []

    def run(job: ShardJob) -> ShardMismatch | None:
        actual, seen = _shard_sha256(job.path, job.offset, job.length)
        if on_progress:
            on_progress(seen)
        if seen != job.length or actual != job.expected:
            return ShardMismatch(job.name, job.index, job.offset)
        return None

    with ThreadPoolExecutor(max_workers=workers or cpu_count(), thread_name_prefix="verify") as pool:
        for result in pool.map(run, jobs):
            if result:
                mismatches.append(result)
    return sorted(mismatches, key=lambda m: (m.path, m.index))


def compare_shards(name: str, expected: FileDigest, found: ShardDigests, shard_size: int) -> ShardMismatch | None:
    """The first shard where bytes hashed as they streamed past differ from the expected digests, if any."""
    for i, (want, got) in enumerate(zip_longest(expected.shards, found.shards)):
        if want != got:
            return ShardMismatch(name, i, i * shard_size)
    if found.size != expected.size:  # same digests, other length: only possible for a length the shards cannot tell
        last = shard_count(expected.size, shard_size) - 1
        return ShardMismatch(name, last, last * shard_size)
    return None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
