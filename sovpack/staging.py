"""The files of a bundle being imported, written into the store's staging directory as the stream is read.

Each file's bytes go, as they are written, to a ShardHasher on a thread of its own, so that
when the stream has ended the shard digests of every written file are those of the very bytes
in its staging file; verification compares them with the signed ones instead of reading the
files again (`verify_bundle(known_digests=...)`).

Large files are flushed to disk on another thread while they are written (every
pipeline.FLUSH_STEP bytes); the last stretch of each file, and every small file, is flushed
by `finish`, once the stream has been read and judged: a staging that a damaged volume makes
the import discard is not flushed for nothing. `finish` returns once every byte is hashed and
on disk.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from sovpack.errors import Failure
from sovpack.hashing import ShardDigests, ShardHasher
from sovpack.pipeline import FlushedFile, Lane, fsync_path, wait_all

if TYPE_CHECKING:
    from sovpack.volume_io import ConcatenatedReader


class StagedFiles:
    def __init__(self, root: Path):
        self.root = root
        self._hash_lane = Lane("staging-sha256")
        self._flush_lane = Lane("staging-flush")
        self._digests: dict[str, Future] = {}
        self._written: list[Path] = []  # to flush in `finish`
        self._flushes: list[Future] = []
        self._abandoned = threading.Event()
        self._closed = False

    def target(self, rel: str) -> Path:
        """Where `rel` goes in the staging directory (its parent directories created)."""
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, rel: str, data: bytes) -> None:
        """A small file read whole from the stream (sovpack.json, a signature): verification reads it again."""
        f = self._create(rel, len(data))
        try:
            f.write(data)
        except OSError as e:
            raise write_failure(rel, self.root, e) from None
        finally:
            self._close(f)

    def copy(self, rel: str, size: int, reader: ConcatenatedReader, shard_size: int) -> None:
        """Copy the next `size` bytes of the stream into `rel`, hashing its shards from the very bytes written."""
        hasher = ShardHasher(shard_size)
        f = self._create(rel, size)
        done = 0
        try:
            while done < size:
                chunk = reader.read_chunk(size - done)
                if not chunk:
                    raise reader.ends_inside(rel, done, size)
                reader.hold(self._hash_lane.submit(hasher.update, chunk))
                try:
                    f.write(chunk)
                except OSError as e:
                    raise write_failure(rel, self.root, e) from None
                done += len(chunk)
        finally:
            self._close(f)
        self._digests[rel] = self._hash_lane.submit(hasher.finish)

    def _close(self, f: FlushedFile) -> None:
        """Close on the flush lane; the final fsync waits for `finish`. Every fdatasync's error counts: Linux reports it once."""
        f.close(flush=False)
        self._flushes += f.flushes

    def _create(self, rel: str, size: int) -> FlushedFile:
        path = self.target(rel)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise write_failure(rel, self.root, e) from None
        self._written.append(path)
        return FlushedFile(path, fd, self._flush_lane, self._abandoned, size)

    def finish(self) -> dict[str, ShardDigests]:
        """Once every written file is hashed and on disk: the shard digests of each, by path in the bundle."""
        digests = {rel: future.result() for rel, future in self._digests.items()}
        try:
            try:
                wait_all(self._flushes)
            except OSError as e:
                raise _flush_failure(e) from None
            flush_files(self._written)
        finally:
            self.close()
        return digests

    def abort(self) -> None:
        """The staging is being discarded: stop flushing, close every file, wait for the threads."""
        self._abandoned.set()
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hash_lane.close()
            self._flush_lane.close()  # every file handed to it gets closed


def flush_files(paths: Iterable[Path]) -> None:
    """fsync each file (the bytes must be on disk before the commit renames them into place)."""
    try:
        for path in paths:
            fsync_path(path)
    except OSError as e:
        raise _flush_failure(e) from None


def flush_tree(root: Path) -> None:
    flush_files(files_under(root))


def files_under(root: Path) -> Iterator[Path]:
    """Every file of a staged tree (which holds only directories and regular files)."""
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory, name)


def _flush_failure(e: OSError) -> Failure:
    return Failure(f"cannot flush the staged bundle to the store's disk: {e.strerror} ({e.filename})")


def write_failure(rel: str, staging: Path, e: OSError) -> Failure:
    full = ""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        full = " (the store's disk is full or does not allow files this large)"
    return Failure(f"cannot write {rel} into the store's staging directory {staging}: {e.strerror}{full}")
