"""The served GGUF held open: its bytes are hashed from the descriptor, and that very inode is what llama.cpp maps.

Verifying a path and then loading the path leaves a gap: a file renamed over the GGUF after
its check and renamed back once llama.cpp has mapped it would be served while every later
check of the path passes. So serve opens each GGUF part once, hashes the bytes read through
that descriptor, hands the descriptor to the engine's worker processes (which load
`/proc/self/fd/N`, the same inode whatever the path now names), and checks each worker's
memory map (/proc/PID/maps) against that inode after loading and before every request.

The (device, inode) that /proc/PID/maps shows is the one the kernel maps, which on some
file systems (overlayfs) differs from what stat() reports; the reference is therefore
taken the same way, by mapping one page of the descriptor in this process and reading
/proc/self/maps.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from sovpack.bundle.metadata import FileEntry
from sovpack.bundle.verify import StepFailed, digest_failure
from sovpack.common.hashing import check_shards, shard_jobs
from sovpack.errors import Refused
from sovpack.server.fingerprint import Fingerprint

MapIdentity = tuple[int, int, int]  # device major, minor, inode: as /proc/PID/maps shows a mapped file


@dataclass(frozen=True)
class OpenedFile:
    name: str  # the file's path inside the bundle, for messages
    path: Path
    fd: int
    fingerprint: Fingerprint  # of the open inode (fstat), taken when it was opened
    mapped_as: MapIdentity

    @classmethod
    def open(cls, path: Path, name: str) -> OpenedFile:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return cls(name, path, fd, Fingerprint.of_fd(fd), _map_identity(fd))
        except BaseException:
            os.close(fd)
            raise

    @property
    def proc_path(self) -> str:
        """This process's name for the open inode; in a worker that inherited the same descriptor number, its name too."""
        return f"/proc/self/fd/{self.fd}"

    def current_fingerprint(self) -> Fingerprint:
        return Fingerprint.of_fd(self.fd)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def check_opened_digests(opened: list[OpenedFile], entries: dict[str, FileEntry], shard_size: int) -> int:
    """Hash the open descriptors (all cores) against the signed shard digests; StepFailed("digests") naming the file."""
    jobs = []
    for f in opened:
        entry = entries[f.name]
        size = f.current_fingerprint().size
        if size != entry.size:
            change = "truncated" if size < entry.size else "grown"
            raise StepFailed("digests", f"{f.name} has {size} bytes, the signed inventory says {entry.size} ({change})", f.name)
        jobs += shard_jobs(f.name, Path(f.proc_path), entry.digest, shard_size)
    mismatches = check_shards(jobs)
    if mismatches:
        raise digest_failure(mismatches)
    return sum(entries[f.name].size for f in opened)


def _map_identity(fd: int) -> MapIdentity:
    size = os.fstat(fd).st_size
    if size == 0:  # nothing can be mapped; such a file is no GGUF and fails verification anyway
        st = os.fstat(fd)
        return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    with mmap.mmap(fd, min(size, mmap.PAGESIZE), access=mmap.ACCESS_COPY) as page:
        pointer = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(pointer)
        try:
            for start, end, identity, _ in mapped_files(os.getpid()):
                if start <= address < end:
                    return identity
        finally:
            del pointer  # the buffer must be released before the map can close
    raise RuntimeError("cannot find a page just mapped in /proc/self/maps")


def mapped_files(pid: int, mentioning: tuple[str, ...] = ()) -> list[tuple[int, int, MapIdentity, str]]:
    """(start, end, (major, minor, inode), path) of the file-backed mappings of process `pid`.

    `mentioning`: only the lines that contain one of these strings (an inode number, a path),
    which keeps the check before each request cheap (a worker has a few hundred mappings).
    """
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        if mentioning and not any(m in line for m in mentioning):
            continue
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[4] == "0":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        found.append((start, end, (major, minor, int(fields[4])), fields[5]))
    return found


def check_mapped(pid: int, opened: list[OpenedFile], *, required: bool) -> None:
    """Refused unless process `pid` maps the verified inodes, and no other file under a served GGUF's name.

    `required`: llama.cpp keeps the weights mapped (CPU); with GPU offload it may unmap what it copied.
    """
    mentioning = tuple(s for f in opened for s in (f" {f.mapped_as[2]} ", str(f.path)))
    try:
        mappings = mapped_files(pid, mentioning)
    except OSError as e:
        raise Refused(f"cannot read the memory map of the engine's worker process {pid}: {e.strerror}") from None
    identities = {identity for _, _, identity, _ in mappings}
    for f in opened:
        if required and f.mapped_as not in identities:
            raise Refused(
                f"{f.name}: the engine's worker process {pid} has not mapped the verified file (inode {f.fingerprint.ino})"
            )
        names = {str(f.path), f"{f.path} (deleted)"}
        foreign = sorted({path for _, _, identity, path in mappings if path in names and identity != f.mapped_as})
        if foreign:
            raise Refused(
                f"{f.name}: the engine's worker process {pid} maps another file than the verified one "
                f"(inode {f.fingerprint.ino}) under its name"
            )
