"""The files of a bundle being imported, written into the store's staging directory as the stream is read.

Each file's bytes go, as they are written, to a ShardHasher on a thread of its own, so that
when the stream has ended the shard digests of every written file are those of the very bytes
in its staging file; verification compares them with the signed ones instead of reading the
files again (`verify_bundle(known_digests=...)`).

The volumes are read straight into the blocks each file is written from, and the blocks are
written on another thread, around the page cache (pipeline.DirectFile); each file is fsynced
as it is closed. `finish` returns once every byte is hashed and on disk.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from sovpack.common.files import files_under, fsync_path, out_of_room
from sovpack.common.hashing import ShardDigests, ShardHasher
from sovpack.common.pipeline import BufferRing, DirectFile, Lane, wait_all
from sovpack.errors import Failure

if TYPE_CHECKING:
    from sovpack.transfer.media import ConcatenatedReader


class StagedFiles:
    def __init__(self, root: Path):
        self.root = root
        self.ring = BufferRing()
        self._hash_lane = Lane("staging-sha256")
        self._write_lane = Lane("staging-write")
        self._digests: dict[str, Future] = {}
        self._finished: list[Future] = []  # each file's last write, fsync and close
        self._abandoned = threading.Event()
        self._closed = False

    def target(self, rel: str) -> Path:
        """Where `rel` goes in the staging directory (its parent directories created)."""
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_bytes(self, rel: str, data: bytes) -> None:
        """A small file read whole from the stream (sovpack.json, a signature): verification reads it again."""
        f = self._create(rel)
        try:
            f.write(data)
        except OSError as e:
            raise self._write_failure(rel, e) from None
        finally:
            self._finished.append(f.close())

    def copy(self, rel: str, size: int, reader: ConcatenatedReader, shard_size: int) -> None:
        """Copy the next `size` bytes of the stream into `rel`, read straight into its blocks; its shards are hashed from them."""
        hasher = ShardHasher(shard_size)
        f = self._create(rel)
        try:
            while f.size < size:
                space = f.space()
                n, checking = reader.read_into(space[: size - f.size])
                if not n:
                    raise reader.ends_inside(rel, f.size, size)
                f.hold(checking, self._hash_lane.submit(hasher.update, space[:n]))
                f.advance(n)
        except OSError as e:  # the write of an earlier block failed
            raise self._write_failure(rel, e) from None
        finally:
            self._finished.append(f.close())
        self._digests[rel] = self._hash_lane.submit(hasher.finish)

    def _create(self, rel: str) -> DirectFile:
        path = self.target(rel)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise self._write_failure(rel, e) from None
        return DirectFile(path, fd, self.ring, self._write_lane, self._abandoned)

    def _write_failure(self, rel: str, e: OSError) -> Failure:
        """The file at fault is the one the error names: a write fails some blocks after it was handed over."""
        if e.filename and Path(e.filename).is_relative_to(self.root):
            rel = Path(e.filename).relative_to(self.root).as_posix()
        return write_failure(rel, self.root, e)

    def finish(self) -> dict[str, ShardDigests]:
        """Once every written file is hashed and on disk: the shard digests of each, by path in the bundle."""
        try:
            try:
                self.ring.wait()
                wait_all(self._finished)
            except OSError as e:  # a write or an fsync: the error names the file
                raise self._write_failure("a staged file", e) from None
            return {rel: future.result() for rel, future in self._digests.items()}
        finally:
            self.close()

    def abort(self) -> None:
        """The staging is being discarded: stop writing, close every file, wait for the threads."""
        self._abandoned.set()
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hash_lane.close()
            self._write_lane.close()  # every file handed to it gets closed


def flush_files(paths: Iterable[Path]) -> None:
    """fsync each file (the bytes must be on disk before the commit renames them into place)."""
    try:
        for path in paths:
            fsync_path(path)
    except OSError as e:
        raise _flush_failure(e) from None


def flush_tree(root: Path) -> None:
    flush_files(files_under(root))


def _flush_failure(e: OSError) -> Failure:
    return Failure(f"cannot flush the staged bundle to the store's disk: {e.strerror} ({e.filename})")


def write_failure(rel: str, staging: Path, e: OSError) -> Failure:
    full = ""
    if out_of_room(e):
        full = " (the store's disk is full or does not allow files this large)"
    return Failure(f"cannot write {rel} into the store's staging directory {staging}: {e.strerror}{full}")
