"""File-system helpers every stage shares: atomic writes, fsync, locks, free space, "disk full".

- `write_atomically`: a file replaced whole or not at all, on disk when it returns
- `fsync_dir`, `fsync_path`: a rename, a new file or a closed file made to survive a power loss
- `locked`, `try_lock`, `HeldLock`, `lock_open_file`: flock locks among sovpack processes (the kernel
  releases them when a process dies, so a lock file left behind never blocks anyone)
- `free_space`, `require_free_space`: room on the file system that would hold a path
- `DISK_FULL`, `FILE_TOO_LARGE`, `out_of_room`: the one reading of a failed write's errno
- `files_under`, `remove_tree`, `make_read_only`: walking, deleting and sealing the trees sovpack stages
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sovpack.errors import Failure

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})  # no room left on the file system, or in the user's quota
FILE_TOO_LARGE = errno.EFBIG  # a file larger than the file system (FAT32: 4 GiB - 1) or `ulimit -f` allows


def out_of_room(error: OSError) -> bool:
    """A write refused for want of room: the disk or quota is full, or the file may not grow this large."""
    return error.errno in DISK_FULL or error.errno == FILE_TOO_LARGE


# ---- durable writes


def write_atomically(path: Path, data: bytes, mode: int = 0o644, tmp_dir: Path | None = None) -> None:
    """Write to a temporary file, then rename it into place and sync the directory.

    `tmp_dir` keeps the temporary file out of a bundle directory, where a process killed
    mid-write would otherwise leave an unlisted file behind; it is used only when the rename
    can work from there (same file system, writable), which a bundle at a mount point is not.
    """
    staging = tmp_dir if tmp_dir is not None and _can_stage_for(path.parent, tmp_dir) else path.parent
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _can_stage_for(directory: Path, tmp_dir: Path) -> bool:
    try:
        return tmp_dir.stat().st_dev == directory.stat().st_dev and os.access(tmp_dir, os.W_OK)
    except OSError:
        return False


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file that is no longer open to disk; an error names the file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


# ---- locks


def lock_open_file(fd: int) -> None:
    """Wait for the exclusive lock on an open file (released when it is closed)."""
    fcntl.flock(fd, fcntl.LOCK_EX)


@contextmanager
def locked(path: Path, mode: int = 0o644) -> Iterator[None]:
    """Hold the exclusive lock on the file `path` (created if need be), waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        lock_open_file(fd)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path, mode: int = 0o644) -> int | None:
    """The exclusive lock on the file `path` (created if need be) without waiting: its open descriptor, or None if held.

    Closing the descriptor releases the lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class HeldLock:
    """The exclusive lock on the file `path`, taken without waiting by `with`: Failure(`busy`) when another process holds it."""

    def __init__(self, path: Path, busy: str, mode: int = 0o644):
        self.path, self.busy, self.mode = path, busy, mode
        self._fd: int | None = None

    def __enter__(self) -> HeldLock:
        self._fd = try_lock(self.path, self.mode)
        if self._fd is None:
            raise Failure(self.busy)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---- free space


def free_space(path: Path) -> int:
    """Bytes free for an unprivileged user on the file system that holds (or would hold) `path`."""
    existing = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing).free


def require_free_space(path: Path, needed: int, refusal: Callable[[int], str]) -> None:
    """Raise Failure(refusal(free bytes)) unless `needed` bytes are free where `path` is."""
    free = free_space(path)
    if needed > free:
        raise Failure(refusal(free))


# ---- staged trees


def files_under(root: Path) -> Iterator[Path]:
    """Every file of a staged tree (which holds only directories and regular files)."""
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory, name)


def remove_tree(path: Path) -> None:
    """Delete a tree whose files and directories may be read-only; nothing when it does not exist."""
    if not path.exists():
        return
    for directory, _, _ in os.walk(path):  # top-down: each directory is made writable before it is entered
        os.chmod(directory, 0o755)
    shutil.rmtree(path)


def make_read_only(root: Path) -> None:
    """Files 0444 and directories 0555, bottom-up, so that nothing in the tree can be renamed, added or removed
    without first changing a mode (which an installed bundle's fingerprint would notice)."""
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            _set_mode(os.path.join(directory, name), 0o444)
        _set_mode(directory, 0o555)


def _set_mode(path: str, mode: int) -> None:
    if stat.S_IMODE(os.lstat(path).st_mode) != mode:  # a chmod, even to the same mode, changes the ctime
        os.chmod(path, mode)
