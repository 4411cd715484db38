"""Bytes read once and handed to several consumers, each on a thread of its own, in order.

A `Lane` is one worker thread that runs what it is given in the order it was given (the
SHA-256 of one stream, the writing of files). A `BufferRing` holds the few read buffers in
flight: a buffer is filled again only after every task handed a view of it has finished, so
memory stays at a few buffers whatever the size of the stream, and the error of a task comes
back to the reading thread at the latest when the ring comes round to its buffer.
A `DirectFile` is filled in the ring's buffers by the calling thread and written to disk by a
lane, block by block, around the page cache.
hashlib and file I/O release the GIL, so lanes run in parallel with the reading thread.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sovpack.common.hashing import READ_SIZE

RING_BUFFERS = 6
ALIGN = 4096  # O_DIRECT wants file offsets, lengths and memory aligned to the device's block (512 or 4096 bytes)
O_DIRECT = getattr(os, "O_DIRECT", 0)


class Lane:
    """One worker thread running the calls submitted to it, in submission order."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn, *args) -> Future:
        return self._pool.submit(fn, *args)

    def close(self, *, cancel: bool = False) -> None:
        """Wait for the thread to finish; with `cancel`, calls not yet started are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)


class BufferRing:
    """Reused read buffers, each filled again only once every task reading it has finished."""

    def __init__(self, count: int = RING_BUFFERS, size: int = READ_SIZE):
        self._buffers = [mmap.mmap(-1, size) for _ in range(count)]  # page-aligned, as O_DIRECT needs
        self._readers: list[list[Future]] = [[] for _ in range(count)]
        self._current = -1

    def take(self) -> memoryview:
        """The next buffer, once its previous readers are done (their first error is raised here)."""
        self._current = (self._current + 1) % len(self._buffers)
        wait_all(self._readers[self._current])
        return memoryview(self._buffers[self._current])

    def hold(self, *futures: Future | None) -> None:
        """The buffer last taken is read by these tasks: keep it until they finish."""
        self._readers[self._current].extend(f for f in futures if f is not None)

    def wait(self) -> None:
        """Wait for every task still reading a buffer; raise the first error."""
        errors = []
        for readers in self._readers:
            try:
                wait_all(readers)
            except BaseException as e:  # noqa: BLE001 - every buffer is waited for before raising
                errors.append(e)
        if errors:
            raise errors[0]


def wait_all(futures: list[Future]) -> None:
    """Wait for every future (none is left running), then raise the first error; the list is emptied."""
    error = None
    for future in futures:
        try:
            future.result()
        except BaseException as e:  # noqa: BLE001 - raised below, once all are done
            error = error or e
    futures.clear()
    if error is not None:
        raise error


class DirectFile:
    """A file written block by block straight to the disk, on `lane`, bypassing the page cache.

    The caller fills the current block of `ring` (`space`, then `advance`: a file can be read
    into it with no copy) and names the tasks that read the bytes it put there (`hold`); each
    full block is written with O_DIRECT, so that writing gigabytes neither takes memory from
    the page cache nor leaves them to be flushed at the end. The unaligned end of the last
    block goes through the page cache (padding it could exceed what the medium allows: FAT32
    stops at 4 GiB - 1). Where the file system refuses O_DIRECT, every write goes through the
    page cache, and the final fsync flushes them.

    A failed write comes back when the ring comes round to its block (`space`) or from the
    future `close` returns, as an OSError naming the file. The ring serves one file at a time.
    Once `abandoned` is set (the file is about to be deleted), the lane writes nothing more.
    """

    def __init__(self, path: Path, fd: int, ring: BufferRing, lane: Lane, abandoned: threading.Event):
        self.path, self.fd, self.ring, self.lane, self.abandoned = path, fd, ring, lane, abandoned
        self.direct = _start_direct_io(fd)
        self.size = 0  # bytes put into the file so far
        self._block: memoryview | None = None
        self._fill = 0
        self._failed: OSError | None = None  # the first write that failed, raised again by the future `close` returns

    def space(self) -> memoryview:
        """The free part of the current block (a block of the ring is taken when none is free)."""
        if self._block is None:
            self._block, self._fill = self.ring.take(), 0
        return self._block[self._fill :]

    def advance(self, n: int) -> None:
        """`n` bytes were put at the start of `space()`; a block full is handed to the lane."""
        self._fill += n
        self.size += n
        if self._fill == len(self._block):
            self._submit()

    def hold(self, *futures: Future | None) -> None:
        """Tasks reading the bytes just put in the current block: it is not reused before they finish."""
        self.ring.hold(*futures)

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            space = self.space()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            self.advance(n)
            view = view[n:]

    def close(self) -> Future:
        """Write what is left, fsync (unless the file is being discarded) and close, on the lane."""
        if self._block is not None and self._fill and not self.abandoned.is_set():
            self._submit()
        return self.lane.submit(self._finish)

    def _submit(self) -> None:
        self.ring.hold(self.lane.submit(self._write, self._block[: self._fill], self.size - self._fill))
        self._block = None

    def _write(self, data: memoryview, offset: int) -> None:
        if self.direct and len(data) % ALIGN:  # the file's last block: its unaligned end goes through the page cache
            aligned = len(data) - len(data) % ALIGN
            self._write(data[:aligned], offset)
            self.direct = _stop_direct_io(self.fd)
            data, offset = data[aligned:], offset + aligned
        while data and not self.abandoned.is_set():
            try:
                n = os.pwrite(self.fd, data, offset)
                if not n:
                    raise OSError(errno.EIO, "the file system accepted no byte of a write")
            except OSError as e:
                if e.errno == errno.EINVAL and self.direct:  # alignment the device does not take: through the page cache
                    self.direct = _stop_direct_io(self.fd)
                    continue
                self._failed = self._failed or OSError(e.errno, e.strerror, str(self.path))
                raise self._failed from None
            data, offset = data[n:], offset + n

    def _finish(self) -> None:
        try:
            if self._failed:  # fsync does not report a failed O_DIRECT write
                raise self._failed
            if not self.abandoned.is_set():
                os.fsync(self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        finally:
            os.close(self.fd)


def _start_direct_io(fd: int) -> bool:
    """Turn on O_DIRECT; False where the platform or the file system does not have it."""
    if not O_DIRECT:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | O_DIRECT)
    except OSError:
        return False
    return True


def _stop_direct_io(fd: int) -> bool:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
    return False
