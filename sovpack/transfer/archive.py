"""A bundle as one POSIX tar stream: what export cuts into volumes, and what import reads back safely.

Every member lives under the top directory NAME-vVERSION/: `sovpack.json` first (so that the
reader knows the inventory before any other byte), then `signatures/*.sig`, then the inventory
files sorted by path. Regular files only, mode 0444, owner 0, time = the bundle's creation
time: the same bundle always gives the same bytes, and `cat NAME-vV.* | tar x` gives back the
bundle directory.

Reading trusts nothing in the stream: only regular files (and directories, which are
ignored), only safe relative paths under the expected top directory, only `sovpack.json`,
signature files and files listed in that `sovpack.json`, each at exactly its listed size.
Everything else is refused before a byte of it is written. GNU sparse members (old GNU
headers or pax GNU.sparse.*) are refused as soon as tarfile meets their header: tarfile's
own parsing of their maps is unbounded and raises ValueError on a malformed one.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from sovpack.bundle.directory import is_signature_path
from sovpack.bundle.metadata import MAX_METADATA_BYTES, METADATA_FILE, SIGNATURES_DIR, BundleMetadata, FileEntry, parse_metadata
from sovpack.bundle.signature import MAX_SIGNATURE_BYTES
from sovpack.common.safepath import unsafe_reason
from sovpack.errors import Failure, Refused
from sovpack.transfer.media import ConcatenatedReader
from sovpack.transfer.reassembly import StagedFiles

TAR_FORMAT = tarfile.PAX_FORMAT
MAX_SIGNATURE_FILES = 256
MAX_HEADER_BYTES = 1 << 20  # tar/pax headers tarfile reads whole into memory; real ones are tiny


@dataclass(frozen=True)
class ArchivePlan:
    """What goes into the stream, in order, and exactly how many bytes it will be."""

    root: Path
    top: str
    mtime: int
    members: list[tuple[str, int]]  # (path inside the bundle, size)

    def tarinfo(self, path: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(f"{self.top}/{path}")
        info.size, info.mtime, info.mode = size, self.mtime, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    @cached_property
    def size(self) -> int:
        total = 0
        for path, size in self.members:
            total += len(self.tarinfo(path, size).tobuf(TAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
            total += -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        total += 2 * tarfile.BLOCKSIZE  # end-of-archive marker
        return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_archive(root: Path, metadata: BundleMetadata, signatures: list[str], leave_out: set[str]) -> ArchivePlan:
    members = [(METADATA_FILE, (root / METADATA_FILE).stat().st_size)]
    members += [(s, (root / s).stat().st_size) for s in sorted(signatures)]
    members += [(f.path, f.size) for f in sorted(metadata.files, key=lambda f: f.path) if f.path not in leave_out]
    return ArchivePlan(root, f"{metadata.name}-v{metadata.version}", int(metadata.created.timestamp()), members)


class FileFeed(Protocol):
    """Another reader of one member's bytes as they are written (export: its shard check)."""

    def update(self, chunk: memoryview) -> Future | None: ...  # the task reading `chunk` until it finishes

    def close(self) -> None: ...


def write_archive(plan: ArchivePlan, out, on_file: Callable[[str], FileFeed | None] | None = None) -> None:
    """Write the tar stream to `out` (a VolumeWriter or StreamWriter), reading each file once.

    tarfile writes the headers; the data is copied here through the writer's reused buffers,
    because TarFile.addfile allocates a fresh buffer per chunk, which costs a page fault per
    4 KiB on multi-gigabyte files. `on_file(path)` may return a feed that also gets every chunk.
    """
    for path, size in plan.members:
        out.write(plan.tarinfo(path, size).tobuf(TAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
        feed = on_file(path) if on_file else None
        with _BundleFile(plan.root, path) as f:
            copied = out.copy_from(f, size, feed.update if feed else None)
        if copied != size:
            raise Refused(f"{path} shrank while it was being exported ({copied} of {size} bytes); export again")
        if feed:
            feed.close()
        out.write(bytes(-size % tarfile.BLOCKSIZE))
    end = 2 * tarfile.BLOCKSIZE  # the end-of-archive marker, then zeros up to a whole record, as tar writes
    end += -(out.tell() + end) % tarfile.RECORDSIZE
    out.write(bytes(end))
    if out.tell() != plan.size:
        raise Failure(f"internal error: the tar stream has {out.tell()} bytes, {plan.size} were planned")


class _BundleFile:
    """A file of the bundle being exported: a read error names it (errors writing the stream name what they write)."""

    def __init__(self, root: Path, path: str):
        self.root, self.path = root, path
        try:
            self.file = open(root / path, "rb", buffering=0)
        except OSError as e:
            raise self._failure(e) from None

    def readinto(self, buffer) -> int:
        try:
            return self.file.readinto(buffer)
        except OSError as e:
            raise self._failure(e) from None

    def _failure(self, e: OSError) -> Failure:
        return Failure(f"cannot read {self.path} from {self.root}: {e.strerror}")

    def __enter__(self) -> "_BundleFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


# ---- reading


class SparseMember(Exception):
    """A GNU sparse member, which an export never holds (raised from inside tarfile, so not a TarError)."""


class _ExportTarInfo(tarfile.TarInfo):
    """tarfile's header reader, minus GNU sparse members: refused before their maps are read."""

    def _proc_sparse(self, tarfile):
        raise SparseMember(self.name)

    def _proc_gnusparse_00(self, next, pax_headers, buf):
        raise SparseMember(next.name)

    def _proc_gnusparse_01(self, next, pax_headers):
        raise SparseMember(next.name)

    def _proc_gnusparse_10(self, next, pax_headers, tarfile):
        raise SparseMember(next.name)


@dataclass
class Extracted:
    written: int = 0  # files whose bytes came from the stream
    linked: int = 0  # files taken from the store (already held, or left out of a delta export)


FindObject = Callable[[str, int], "Path | None"]  # (sha256, size) -> a file the store already holds with that digest


class ArchiveExtraction:
    """Rebuild the bundle into `files` (the staging directory) from the stream, in two steps.

    `read_metadata` reads up to the bundle's sovpack.json, so that the caller can decide
    whether to go on (an import stops there when the bundle is installed already);
    `extract_files` reads the rest. Files the store holds are linked, not written. The bytes
    written are hashed and written to disk by `files` meanwhile; `files.finish()` waits for that.
    """

    def __init__(self, reader: ConcatenatedReader, files: StagedFiles, *, find_object: FindObject, top: str | None = None):
        files.root.mkdir(parents=True, exist_ok=True)
        reader.max_read = MAX_HEADER_BYTES
        try:
            self._tar = tarfile.open(fileobj=reader, mode="r:", tarinfo=_ExportTarInfo)
        except SparseMember as e:
            raise _sparse_refusal(reader, e) from None
        except (tarfile.TarError, ValueError, OverflowError) as e:
            raise Refused(f"{reader.where} does not hold a tar stream of a bundle ({e})") from None
        self._reader = reader
        self._extraction = _Extraction(reader, files, find_object, top)

    def read_metadata(self) -> tuple[BundleMetadata, bytes]:
        """The bundle's sovpack.json (parsed, NOT verified yet) and its bytes, the stream's first file."""
        while self._extraction.metadata is None:
            member = _next_member(self._tar, self._reader)
            if member is None:
                raise Refused(f"{self._reader.where} holds no bundle (no {METADATA_FILE})")
            self._extraction.add(member)
        return self._extraction.metadata, self._extraction.raw_metadata

    def extract_files(self, missing_hint: Callable[[FileEntry], str] | None = None) -> Extracted:
        """The rest of the stream; every file sovpack.json lists must be in it or in the store."""
        self.read_metadata()
        while (member := _next_member(self._tar, self._reader)) is not None:
            self._extraction.add(member)
        return self._extraction.finish(missing_hint)


def _next_member(tar: tarfile.TarFile, reader: ConcatenatedReader) -> tarfile.TarInfo | None:
    try:
        return tar.next()
    except SparseMember as e:
        raise _sparse_refusal(reader, e) from None
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:  # ValueError: malformed numbers in headers
        raise Refused(f"{reader.where}: the tar stream is damaged or cut short ({e})") from None


def _sparse_refusal(reader: ConcatenatedReader, e: SparseMember) -> Refused:
    return Refused(f"{e.args[0]} in {reader.where} is a GNU sparse member; bundles hold only regular files")


class _Extraction:
    def __init__(self, reader: ConcatenatedReader, files: StagedFiles, find_object: FindObject, top: str | None):
        self.reader, self.files, self.find_object, self.top = reader, files, find_object, top
        self.metadata: BundleMetadata | None = None  # as read from the stream: NOT verified yet
        self.raw_metadata = b""
        self.seen: set[str] = set()
        self.signatures = 0
        self.by_digest: dict[str, Path] = {}  # files of this bundle already in staging, for identical copies
        self.result = Extracted()

    def add(self, member: tarfile.TarInfo) -> None:
        rel = self._relative_path(member)
        if member.isdir():
            return
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            kind = {
                tarfile.SYMTYPE: "a symbolic link",
                tarfile.LNKTYPE: "a hard link",
                tarfile.CHRTYPE: "a device",
                tarfile.BLKTYPE: "a device",
                tarfile.FIFOTYPE: "a pipe",
            }.get(member.type, "not a regular file")
            raise Refused(f"{member.name} in {self.reader.where} is {kind}; bundles hold only regular files")
        if rel in self.seen:
            raise Refused(f"{member.name} appears twice in {self.reader.where}")
        self.seen.add(rel)
        if self.metadata is None:
            self._read_metadata(member, rel)
        elif rel.split("/")[0] == SIGNATURES_DIR:
            self._add_signature(member, rel)
        else:
            self._add_file(member, rel)

    def _relative_path(self, member: tarfile.TarInfo) -> str:
        name = member.name.rstrip("/") if member.isdir() else member.name
        top, _, rel = name.partition("/")
        if self.top is None and self.metadata is None:
            self.top = top  # a stream names its bundle with its first member; checked against sovpack.json below
        if top != self.top or (not rel and not member.isdir()):
            raise Refused(f"{member.name} in {self.reader.where} is outside the bundle directory {self.top}/")
        reason = unsafe_reason(rel) if rel else None
        if reason:
            raise Refused(f"unsafe path {member.name!r} in {self.reader.where}: {reason}")
        return rel

    def _read_metadata(self, member: tarfile.TarInfo, rel: str) -> None:
        if rel != METADATA_FILE:
            raise Refused(f"{self.reader.where} starts with {member.name}, not {self.top}/{METADATA_FILE}: not a sovpack export")
        if member.size > MAX_METADATA_BYTES:
            raise Refused(f"{member.name} in {self.reader.where} is larger than {MAX_METADATA_BYTES} bytes")
        raw = self.reader.read_exactly(member.size, member.name)
        self.metadata, self.raw_metadata = parse_metadata(raw), raw
        expected_top = f"{self.metadata.name}-v{self.metadata.version}"
        if self.top != expected_top:
            raise Refused(f"the stream's directory {self.top}/ does not match the bundle it holds ({expected_top})")
        self.files.write_bytes(METADATA_FILE, raw)

    def _add_signature(self, member: tarfile.TarInfo, rel: str) -> None:
        self.signatures += 1
        if not is_signature_path(rel) or self.signatures > MAX_SIGNATURE_FILES:
            raise Refused(f"{member.name} in {self.reader.where} does not belong in {SIGNATURES_DIR}/")
        if member.size > MAX_SIGNATURE_BYTES:
            raise Refused(f"{member.name} in {self.reader.where} is larger than {MAX_SIGNATURE_BYTES} bytes; not a signature")
        self.files.write_bytes(rel, self.reader.read_exactly(member.size, member.name))

    def _add_file(self, member: tarfile.TarInfo, rel: str) -> None:
        entry = self.metadata.file(rel)
        if entry is None:
            raise Refused(
                f"{member.name} in {self.reader.where} is not listed in the bundle's {METADATA_FILE}; refused before writing it"
            )
        if member.size != entry.size:
            raise Refused(f"{member.name} in {self.reader.where} has {member.size} bytes, {METADATA_FILE} lists {entry.size}")
        if self._link_known(entry):
            self.result.linked += 1  # held already: its bytes in the stream are read past (for the volumes' check)
            return
        self.files.copy(rel, entry.size, self.reader, self.metadata.shard_size)
        self.result.written += 1
        self.by_digest.setdefault(entry.sha256, self.files.root / rel)

    def _link_known(self, entry: FileEntry) -> bool:
        """Hard-link a file the store (or this bundle) already holds with the listed digest; verify checks it later."""
        for source in (self.by_digest.get(entry.sha256), self.find_object(entry.sha256, entry.size)):
            if source is None:
                continue
            target = self.files.target(entry.path)
            try:
                os.link(source, target)
                return True
            except FileNotFoundError:  # the store collected it meanwhile: take the bytes from the stream
                continue
            except OSError as e:
                raise Failure(f"cannot link {entry.path} from the store's objects: {e.strerror}") from None
        return False

    def finish(self, missing_hint: Callable[[FileEntry], str] | None) -> Extracted:
        for entry in self.metadata.files:
            if entry.path in self.seen:
                continue
            if not self._link_known(entry):
                hint = missing_hint(entry) if missing_hint else ""
                raise Refused(
                    f"{entry.path} ({entry.size} bytes, sha256 {entry.sha256}) is listed in {METADATA_FILE} but is "
                    f"neither in {self.reader.where} nor in the store{hint}"
                )
            self.result.linked += 1
        return self.result
