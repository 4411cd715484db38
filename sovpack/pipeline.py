"""Bytes read once and handed to several consumers, each on a thread of its own, in order.

A `Lane` is one worker thread that runs what it is given in the order it was given (the
SHA-256 of one stream, the flushing of files). A `BufferRing` holds the few read buffers in
flight: a buffer is filled again only after every task handed a view of it has finished, so
memory stays at a few buffers whatever the size of the stream, and the error of a task comes
back to the reading thread at the latest when the ring comes round to its buffer.
A `FlushedFile` is written by the calling thread and flushed to disk on a lane as it grows, so
that the fsync that must end before the file counts as written has little left to do.
hashlib and file I/O release the GIL, so lanes run in parallel with the reading thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from sovpack.hashing import READ_SIZE

RING_BUFFERS = 6
FLUSH_STEP = 128 * 1024 * 1024  # bytes written to a file between two fdatasync on the flush lane


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
        self._buffers = [bytearray(size) for _ in range(count)]
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


class FlushedFile:
    """A file written by the calling thread and flushed to disk on `lane` while it grows.

    An fdatasync is handed to the lane every FLUSH_STEP bytes; when the file's final `size` is
    given, its last FLUSH_STEP bytes are left to the owner's final flush. Every call on the file
    descriptor after the writes (fdatasync, fsync, close) runs on the lane, in order, so the
    descriptor is closed only once nothing uses it any more. Once `abandoned` is set (the file
    is about to be deleted), the lane only closes it.
    """

    def __init__(self, path: Path, fd: int, lane: Lane, abandoned: threading.Event, size: int | None = None):
        self.path, self.fd, self.lane, self.abandoned, self.size = path, fd, lane, abandoned, size
        self.flushes: list[Future] = []
        self.written = 0
        self._flushed = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.written += len(view)
        while view:
            view = view[os.write(self.fd, view) :]
        if self.written - self._flushed >= FLUSH_STEP and (self.size is None or self.written <= self.size - FLUSH_STEP):
            self.flushes.append(self.lane.submit(self._sync, os.fdatasync))
            self._flushed = self.written

    def close(self, *, flush: bool = True) -> Future:
        """Hand the file to the lane: fsync (unless the caller flushes it later, or it is being discarded) and close."""
        done = self.lane.submit(self._close, flush)
        self.flushes.append(done)
        return done

    def _sync(self, sync) -> None:
        if self.abandoned.is_set():
            return
        try:
            sync(self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def _close(self, flush: bool) -> None:
        try:
            if flush:
                self._sync(os.fsync)
        finally:
            os.close(self.fd)


def fsync_path(path: Path) -> None:
    """Flush a file that is no longer open to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)
