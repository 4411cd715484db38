"""Byte streams of volumes: one stream written as numbered volume files, and volumes read back as one stream.

Both stay flat in memory (a few 4 MiB chunks in flight) whatever the size of the bundle.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from sovpack.errors import Failure, Refused
from sovpack.progress import Progress
from sovpack.volumes import ExportIndex, VolumeEntry, volume_name

COPY_SIZE = 4 * 1024 * 1024


class VolumeWriter:
    """A write-only stream cut into volume files of at most `volume_size` bytes, each hashed as written.

    Writing happens on a background thread while this thread hashes, so disk and SHA-256 overlap;
    at most a few chunks are in flight, so memory stays flat.
    """

    IN_FLIGHT = 4

    def __init__(self, directory: Path, stem: str, volume_size: int, progress: Progress | None = None):
        self.directory, self.stem, self.volume_size = directory, stem, volume_size
        self.progress = progress or Progress()
        self.volumes: list[VolumeEntry] = []
        self.written: list[Path] = []  # every file this writer created, for cleanup on failure
        self._file: BinaryIO | None = None
        self._filled = 0
        self._sha256 = hashlib.sha256()
        self._position = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volume-write")
        self._pending: deque[Future] = deque()
        self._ring = [bytearray(COPY_SIZE) for _ in range(self.IN_FLIGHT + 2)]
        self._ring_position = 0

    def tell(self) -> int:
        return self._position

    def copy_from(self, source: BinaryIO, size: int) -> int:
        """Copy `size` bytes of `source` into the volumes through a ring of reused buffers."""
        return _copy(source, size, self._next_buffer, self.write)

    def _next_buffer(self) -> bytearray:
        # write() returns with at most IN_FLIGHT writes pending, oldest first: a buffer used
        # IN_FLIGHT + 1 calls ago has been written and may be filled again.
        self._ring_position = (self._ring_position + 1) % len(self._ring)
        return self._ring[self._ring_position]

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            if self._file is None:
                self._open_next()
            take = min(len(view), self.volume_size - self._filled)
            piece = view[:take]
            self._pending.append(self._pool.submit(_write_all, self._file, piece))
            self._sha256.update(piece)  # while the writer thread writes the previous chunks
            self._filled += take
            view = view[take:]
            while len(self._pending) > self.IN_FLIGHT:
                self._wait(self._pending.popleft())
            if self._filled == self.volume_size:
                self._close_current()
        self._position += total
        self.progress.advance(total)
        return total

    def _open_next(self) -> None:
        path = self.directory / volume_name(self.stem, len(self.volumes) + 1)
        self.written.append(path)
        try:
            self._file = open(path, "wb", buffering=0)
        except OSError as e:
            raise Failure(f"cannot create volume {path}: {e.strerror}") from None
        self._filled = 0
        self._sha256 = hashlib.sha256()

    def _wait(self, future: Future) -> None:
        try:
            future.result()
        except OSError as e:
            name = self.written[-1].name if self.written else self.stem
            raise Failure(f"cannot write volume {name} in {self.directory}: {e.strerror}"
                          + (" (the destination is full or does not allow files this large)" if e.errno in (errno.ENOSPC, errno.EFBIG) else "")) from None  # fmt: skip

    def _close_current(self) -> None:
        while self._pending:
            self._wait(self._pending.popleft())
        try:
            os.fsync(self._file.fileno())  # media are unplugged right after an export: the bytes must be on them
        except OSError as e:
            raise Failure(f"cannot flush volume {self.written[-1].name} to {self.directory}: {e.strerror}") from None
        finally:
            self._file.close()
        self.volumes.append(VolumeEntry(self.written[-1].name, self._filled, self._sha256.hexdigest()))
        self._file = None

    def close(self) -> list[VolumeEntry]:
        if self._file is not None:
            self._close_current()
        self._pool.shutdown()
        return self.volumes

    def abort(self) -> None:
        """Remove every volume written so far (an export that fails leaves nothing behind)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._file is not None:
            self._file.close()
        for path in self.written:
            path.unlink(missing_ok=True)


def _write_all(f: BinaryIO, view: memoryview) -> None:
    while view:
        view = view[f.write(view) :]


class StreamWriter:
    """A stream (stdout, for a data diode) that knows how many bytes went through it."""

    def __init__(self, stream: BinaryIO, progress: Progress | None = None):
        self.stream, self.progress, self._position = stream, progress or Progress(), 0
        self._buffer = bytearray(COPY_SIZE)

    def tell(self) -> int:
        return self._position

    def write(self, data) -> int:
        self.stream.write(data)
        n = len(data)
        self._position += n
        self.progress.advance(n)
        return n

    def copy_from(self, source: BinaryIO, size: int) -> int:
        return _copy(source, size, lambda: self._buffer, self.write)


def _copy(source: BinaryIO, size: int, next_buffer, write) -> int:
    """Copy `size` bytes of `source` through `write`; returns how many there were."""
    done = 0
    while done < size:
        view = memoryview(next_buffer())
        n = source.readinto(view[: min(len(view), size - done)])
        if not n:
            break
        write(view[:n])
        done += n
    return done


# ---- reading volumes back as one stream


class ConcatenatedReader:
    """The volumes (or a pipe) read as one stream, forward only, knowing which volume each byte is in."""

    def __init__(self, parts: list[Path] | None = None, stream: BinaryIO | None = None, progress: Progress | None = None):
        self.parts = list(parts or [])
        self.stream = stream
        self.progress = progress or Progress()
        self._part = -1
        self._file: BinaryIO | None = stream
        self._position = 0
        self.max_read: int | None = None  # cap on read(): tarfile reads whole headers into memory
        self._kernel_copy_failed = False

    @classmethod
    def of_volumes(cls, directory: Path, index: ExportIndex, progress: Progress | None = None) -> "ConcatenatedReader":
        return cls([directory / v.file for v in index.volumes], progress=progress)

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
        if self._part + 1 >= len(self.parts):
            return False
        self._part += 1
        try:
            self._file = open(self.parts[self._part], "rb", buffering=0)
        except OSError as e:
            raise Failure(f"cannot open volume {self.parts[self._part]}: {e.strerror}") from None
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._file is None and not self._open_next_part():
                return 0
            try:
                n = self._file.readinto(view)
            except OSError as e:
                raise Failure(f"cannot read {self.where}: {e.strerror}") from None
            if n:
                self._position += n
                self.progress.advance(n)
                return n
            if not self._open_next_part():
                return 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("read() needs a size: the volumes are read as a stream")
        if self.max_read is not None and size > self.max_read:
            raise Refused(f"a tar header in {self.where} claims {size} bytes; refused as malformed")
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            n = self.readinto(view[filled:])
            if not n:
                break
            filled += n
        del view
        return bytes(buffer[:filled]) if filled < size else bytes(buffer)

    def copy_into(self, out_fd: int, size: int) -> int:
        """Copy up to `size` bytes to `out_fd` inside the kernel (as cp does); 0 when only a plain copy works.

        Only volumes on a file system that allows copy_file_range to the destination qualify;
        a pipe, or media the kernel cannot copy from directly, is read and written instead.
        """
        if self.stream is not None or self._kernel_copy_failed:
            return 0
        copied = 0
        while copied < size:
            if self._file is None and not self._open_next_part():
                break
            here = self._file.tell()
            try:
                n = os.copy_file_range(self._file.fileno(), out_fd, min(size - copied, 1 << 30), here)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and copied == 0:
                    self._kernel_copy_failed = True
                    return 0
                raise
            if n == 0:
                if not self._open_next_part():
                    break
                continue
            self._file.seek(here + n)
            copied += n
            self._position += n
            self.progress.advance(n)
        return copied

    def seek(self, offset: int, whence: int = 0) -> int:
        """Forward only: tarfile seeks past member padding, and sovpack past members it already holds."""
        target = offset if whence == 0 else self._position + offset
        if whence not in (0, 1) or target < self._position:
            raise OSError(f"cannot seek backwards in {self.where}")
        while target > self._position:
            if self._file is None and not self._open_next_part():
                break
            if self.stream is not None:  # a pipe: read and drop
                if not self.read(min(target - self._position, 1 << 20)):
                    break
                continue
            here = self._file.tell()
            step = min(target - self._position, os.fstat(self._file.fileno()).st_size - here)
            if step <= 0:
                if not self._open_next_part():
                    break
                continue
            self._file.seek(here + step)
            self._position += step
            self.progress.advance(step)
        return self._position

    def close(self) -> None:
        if self._file is not None and self.stream is None:
            self._file.close()
        self._file = None
