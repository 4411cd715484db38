"""Byte streams of volumes: one stream written as numbered volume files, and volumes read back as one stream.

Both read each byte once into a ring of reused buffers and hand it to the threads that hash
or write it (common/pipeline.py), so memory stays flat (a few 4 MiB buffers) whatever the size of
the bundle.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sovpack.common.files import out_of_room
from sovpack.common.pipeline import BufferRing, DirectFile, Lane, wait_all
from sovpack.common.progress import Progress
from sovpack.errors import Failure, Refused
from sovpack.transfer.index import ExportIndex, VolumeEntry, volume_name

if TYPE_CHECKING:
    from sovpack.transfer.stream_check import StreamedVolumeCheck

Tap = Callable[[memoryview], "Future | None"]  # another consumer of each chunk copied (export: the shard check)


class VolumeWriter:
    """A write-only stream cut into volume files of at most `volume_size` bytes.

    The writing thread fills the blocks of a ring (a bundle file is read straight into them);
    each volume's SHA-256 is computed on a thread of its own from the very bytes written, and
    the blocks are written to the medium on another, around the page cache (pipeline.DirectFile):
    media are unplugged right after an export, so every volume is on disk when `close` returns.
    """

    def __init__(self, directory: Path, stem: str, volume_size: int, progress: Progress | None = None):
        self.directory, self.stem, self.volume_size = directory, stem, volume_size
        self.progress = progress or Progress()
        self.written: list[Path] = []  # every file this writer created, for cleanup on failure
        self.ring = BufferRing()
        self._hash_lane = Lane("volume-sha256")
        self._write_lane = Lane("volume-write")
        self._file: DirectFile | None = None
        self._sha256 = hashlib.sha256()
        self._closed: list[tuple[str, int, Future]] = []  # (file, size, its SHA-256 once computed)
        self._finished: list[Future] = []  # each volume's last write, fsync and close
        self._abandoned = threading.Event()
        self._position = 0

    def tell(self) -> int:
        return self._position

    def copy_from(self, source: BinaryIO, size: int, tap: Tap | None = None) -> int:
        """Copy `size` bytes of `source` into the volumes, read straight into their blocks; each chunk also goes to `tap`."""
        done = 0
        while done < size:
            space = self._space()
            n = source.readinto(space[: size - done])
            if not n:
                break
            self._advance(space[:n], tap)
            done += n
        return done

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            space = self._space()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            self._advance(space[:n])
            view = view[n:]
        return total

    def _space(self) -> memoryview:
        """Room left in the current block of the current volume."""
        if self._file is None:
            self._open_next()
        try:
            space = self._file.space()
        except OSError as e:  # the write of an earlier block failed
            raise self._failure(e) from None
        return space[: self.volume_size - self._file.size]

    def _advance(self, chunk: memoryview, tap: Tap | None = None) -> None:
        """`chunk` was put into the space given: hash it, hand it to `tap`, and count it written."""
        self._file.hold(self._hash_lane.submit(self._sha256.update, chunk), tap(chunk) if tap else None)
        self._file.advance(len(chunk))
        self._position += len(chunk)
        self.progress.advance(len(chunk))
        if self._file.size == self.volume_size:
            self._close_current()

    def _open_next(self) -> None:
        path = self.directory / volume_name(self.stem, len(self._closed) + 1)
        self.written.append(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise Failure(f"cannot create volume {path}: {e.strerror}") from None
        self._file = DirectFile(path, fd, self.ring, self._write_lane, self._abandoned)
        self._sha256 = hashlib.sha256()

    def _failure(self, e: OSError) -> Failure:
        """A write, or the fsync that ends a volume, failed (the OSError names the volume)."""
        name = Path(e.filename).name if e.filename else self.written[-1].name
        full = " (the destination is full or does not allow files this large)" if out_of_room(e) else ""
        return Failure(f"cannot write volume {name} in {self.directory}: {e.strerror}{full}")

    def _close_current(self) -> None:
        self._closed.append((self.written[-1].name, self._file.size, self._hash_lane.submit(self._sha256.hexdigest)))
        self._finished.append(self._file.close())
        self._file = None

    def close(self) -> list[VolumeEntry]:
        """Every volume hashed and on the medium: their entries for the index."""
        if self._file is not None:
            self._close_current()
        try:
            self.ring.wait()
            wait_all(self._finished)
        except OSError as e:
            raise self._failure(e) from None
        volumes = [VolumeEntry(name, size, sha256.result()) for name, size, sha256 in self._closed]
        self._hash_lane.close()
        self._write_lane.close()
        return volumes

    def abort(self) -> None:
        """Remove every volume written so far (an export that fails leaves nothing behind)."""
        self._abandoned.set()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._hash_lane.close(cancel=True)
        self._write_lane.close()  # closes every file it was handed
        for path in self.written:
            path.unlink(missing_ok=True)


class StreamWriter:
    """A stream (stdout, for a data diode) that knows how many bytes went through it."""

    def __init__(self, stream: BinaryIO, progress: Progress | None = None):
        self.stream, self.progress, self._position = stream, progress or Progress(), 0
        self.ring = BufferRing()

    def tell(self) -> int:
        return self._position

    def write(self, data) -> int:
        self.stream.write(data)
        n = len(data)
        self._position += n
        self.progress.advance(n)
        return n

    def copy_from(self, source: BinaryIO, size: int, tap: Tap | None = None) -> int:
        """Copy `size` bytes of `source` to the stream through the ring's buffers; each chunk also goes to `tap`."""
        done = 0
        while done < size:
            view = self.ring.take()
            n = source.readinto(view[: min(len(view), size - done)])
            if not n:
                break
            chunk = view[:n]
            if tap is not None:
                self.ring.hold(tap(chunk))
            self.write(chunk)
            done += n
        return done

    def close(self) -> None:
        self.ring.wait()
        self.stream.flush()


# ---- reading volumes back as one stream


class ConcatenatedReader:
    """The volumes (or a pipe) read as one stream, forward only, knowing which volume each byte is in.

    With a `checker` (stream_check.py), every byte read from the volumes goes to it, bytes
    skipped by seeking included: reading the stream once is what checks every volume.
    """

    def __init__(
        self,
        parts: list[Path] | None = None,
        stream: BinaryIO | None = None,
        progress: Progress | None = None,
        checker: StreamedVolumeCheck | None = None,
    ):
        self.parts = list(parts or [])
        self.stream = stream
        self.progress = progress or Progress()
        self.checker = checker
        self.ring = BufferRing()
        self._part = -1
        self._file: BinaryIO | None = stream
        self._position = 0
        self.max_read: int | None = None  # cap on read(): tarfile reads whole headers into memory

    @classmethod
    def of_volumes(
        cls, directory: Path, index: ExportIndex, progress: Progress | None = None, checker: StreamedVolumeCheck | None = None
    ) -> "ConcatenatedReader":
        return cls([directory / v.file for v in index.volumes], progress=progress, checker=checker)

    @property
    def where(self) -> str:
        """The volume (or "the stream") currently being read, for messages."""
        if self.stream is not None:
            return "the stream"
        return self.parts[max(self._part, 0)].name if self.parts else "the volumes"

    def tell(self) -> int:
        return self._position

    def _open_next_part(self) -> bool:
        """Move on to the next volume; False after the last one (a pipe is a single part)."""
        if self.stream is not None:
            return False
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.checker:
                self.checker.end(self._part)
        if self._part + 1 >= len(self.parts):
            return False
        self._part += 1
        try:
            self._file = open(self.parts[self._part], "rb", buffering=0)
        except OSError as e:
            self._unreadable(e)
        return True

    def _read(self, view: memoryview) -> int:
        while True:
            if self._file is None and not self._open_next_part():
                return 0
            try:
                n = self._file.readinto(view)
            except OSError as e:
                self._unreadable(e)
            if n:
                self._position += n
                self.progress.advance(n)
                return n
            if not self._open_next_part():
                return 0

    def _unreadable(self, e: OSError) -> None:
        """A volume that cannot be read is damaged; with a checker, reading goes on with the next volume."""
        where = self.where
        if self.checker is None:
            raise Failure(f"cannot read {where}: {e.strerror}") from None
        if self._file is not None:
            self._file.close()
            self._file = None
        self.checker.unreadable(self._part, e)
        raise Refused(f"cannot read {where} ({e.strerror}): the volume is damaged") from None

    def readinto(self, buffer) -> int:
        """Read into the caller's buffer (tar headers, sovpack.json, signatures); the checker gets a copy."""
        view = memoryview(buffer).cast("B")
        n = self._read(view)
        if n and self.checker:
            self.checker.feed(self._part, bytes(view[:n]))
        return n

    def read_into(self, view: memoryview) -> tuple[int, Future | None]:
        """Read into the caller's `view` with no copy: how many bytes, and the checker's task reading them until it finishes."""
        n = self._read(view)
        return n, self.checker.feed(self._part, view[:n]) if n and self.checker else None

    def read_chunk(self, limit: int) -> memoryview:
        """Up to `limit` bytes (empty at the end) in a buffer of the ring: valid until the tasks `hold` names finish."""
        view = self.ring.take()
        chunk = view[: self._read(view[: min(len(view), limit)])]
        if chunk and self.checker:
            self.ring.hold(self.checker.feed(self._part, chunk))
        return chunk

    def read(self, size: int = -1) -> bytes:
        """tarfile's reads (headers): up to `size` bytes, fewer only at the end of the stream."""
        if size is None or size < 0:
            raise ValueError("read() needs a size: the volumes are read as a stream")
        if self.max_read is not None and size > self.max_read:
            raise Refused(f"a tar header in {self.where} claims {size} bytes; refused as malformed")
        buffer = bytearray(size)
        filled = self._fill(memoryview(buffer))
        return bytes(buffer[:filled]) if filled < size else bytes(buffer)

    def read_exactly(self, size: int, name: str) -> bytes:
        """The `size` bytes of member `name` (sovpack.json, a signature); a stream that ends first is refused."""
        buffer = bytearray(size)
        filled = self._fill(memoryview(buffer))
        if filled < size:
            raise self.ends_inside(name, filled, size)
        return bytes(buffer)

    def _fill(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            n = self.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def ends_inside(self, name: str, done: int, size: int) -> Refused:
        """The refusal when the stream ends after `done` of the `size` bytes of member `name`, worded by the source."""
        if self.stream is not None:
            cause = "the stream was cut short; send it again"
        else:
            cause = "the volumes the index lists end before the bundle does: the export is incomplete"
        return Refused(f"{self.where} ends inside {name} ({done} of {size} bytes): {cause}")

    def seek(self, offset: int, whence: int = 0) -> int:
        """Forward only, by reading: tarfile seeks past member padding, and sovpack past members it already holds."""
        target = offset if whence == 0 else self._position + offset
        if whence not in (0, 1) or target < self._position:
            raise OSError(f"cannot seek backwards in {self.where}")
        while self._position < target and self.read_chunk(target - self._position):
            pass
        return self._position

    def drain(self) -> None:
        """Read the rest of the stream (after the tar stream ended, or failed): every volume reaches the checker."""
        while True:
            try:
                if not self.read_chunk(1 << 62):
                    return
            except Refused:
                continue  # an unreadable volume is recorded as damaged; go on with the next

    def close(self) -> None:
        """Stop reading (tasks still hashing a chunk keep its buffer alive; their owners wait for them)."""
        if self._file is not None and self.stream is None:
            self._file.close()
        self._file = None
