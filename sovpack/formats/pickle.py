"""Recognise pickles by their bytes, wherever a loader would find one: they run arbitrary code when loaded.

Three places, each read with bounds:

- the file itself, from its first byte: `pickle.load` reads opcodes until STOP and ignores
  what follows, so a file is a pickle when its first bytes are a well-formed opcode stream
  that reaches STOP (protocols 0 and 1 have no header: a protocol 0 pickle is ASCII);
  pickletools walks the opcodes without building or calling anything;
- a numpy `.npy` array of Python objects (dtype 'O'), whose data is a pickle;
- a zip archive, found by its central directory at the end of the file whatever comes
  before it (as zipfile, torch and numpy find one), and, in files that are not weights, by
  any local member header at any offset: every member is read (bounded) and checked the same
  way, zips inside zips included. This is how `torch.save` (data.pkl) and `.npz` hide pickles.

Names count only to refuse more: an extension used for pickles (.bin, .pt, ...) is refused
unless an operator allowance names the file, and even then its bytes are checked.
"""

from __future__ import annotations

import io
import itertools
import mmap
import pickletools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"}
NPY_MAGIC = b"\x93NUMPY"
ZIP_LOCAL_HEADER = b"PK\x03\x04"
ZIP_END_RECORD = b"PK\x05\x06"
MAX_PICKLE_SCAN = 16 << 20  # a stream still well-formed after this many bytes is taken for a pickle
MAX_MEMBER_BYTES = 16 << 20  # bytes of each zip member examined (decompressed)
MAX_MEMBERS = 10_000
MAX_ZIP_BYTES = 1 << 30  # zip content examined per file, all members and nesting levels together
MAX_ZIP_DEPTH = 3
MAX_NPY_HEADER = 1 << 20

# opcodes that import or call: what makes a pickle run code rather than only hold data
_CALLS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}
_CALLS |= {"PERSID", "BINPERSID"}
# a dtype of Python objects anywhere in an npy header's description: '|O', 'O', '<O8', ...
_NPY_OBJECT = re.compile(r"""['"][|<>=]?O\d*['"]""")


@dataclass(frozen=True)
class PickleStream:
    protocol: int
    calls: bool  # imports or calls something: it runs code when loaded
    complete: bool = True  # False: only the protocol header (0x80, 2-5) of one, the rest damaged or cut
    opcodes: int = 0

    @property
    def certain(self) -> bool:
        """Not a coincidence: random bytes read as `N.` or `.` now and then, a pickle that calls or declares itself does not."""
        return self.calls or self.protocol >= 2 or self.opcodes >= 3

    def describe(self) -> str:
        return f"a pickle of protocol {self.protocol}" + ("" if self.complete else " (its header; the rest is damaged)")


class _Bounded(io.RawIOBase):
    """At most `limit` bytes of a buffer, for pickletools (whose length-prefixed reads could ask for gigabytes)."""

    def __init__(self, data, limit: int):
        self.data, self.limit, self.pos = data, min(limit, len(data)), 0

    def read(self, n: int = -1) -> bytes:
        end = self.limit if n is None or n < 0 else min(self.limit, self.pos + n)
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        return chunk

    def readline(self, size: int = -1) -> bytes:
        end = self.limit if size is None or size < 0 else min(self.limit, self.pos + size)
        newline = self.data.find(b"\n", self.pos, end)
        return self.read((newline + 1 if newline >= 0 else end) - self.pos)

    def tell(self) -> int:
        return self.pos

    def exhausted(self) -> bool:
        return self.pos >= self.limit


def pickle_stream(data) -> PickleStream | None:
    """The pickle that `data` (bytes, mmap) starts with, or None when its first bytes are not one."""
    if not data:
        return None
    reader = _Bounded(data, MAX_PICKLE_SCAN)
    protocol, calls, opcodes = 0, False, 0
    try:
        for opcode, arg, _ in pickletools.genops(reader):
            opcodes += 1
            if opcode.name == "PROTO":
                protocol = arg
            protocol = max(protocol, opcode.proto)
            calls = calls or opcode.name in _CALLS
            if opcode.name == "STOP":
                stream = PickleStream(protocol, calls, opcodes=opcodes)
                return stream if stream.certain else None
    except Warning:  # a warning made an error (python -W error) inside a string opcode: not evidence of a non-pickle
        return PickleStream(protocol, True, complete=False)
    except Exception:  # noqa: BLE001 - pickletools raises ValueError, struct.error, UnicodeDecodeError, ... on non-pickles
        # Still reading a pickle's opcodes where the scan stops: a long pickle (a protocol 0 opcode reading a
        # line of zeros to the limit is not one: nothing came before it).
        if reader.exhausted() and len(data) > MAX_PICKLE_SCAN and (calls or opcodes >= 3):
            return PickleStream(protocol, True, complete=False, opcodes=opcodes)
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return PickleStream(data[1], True, complete=False)
    return None


def npy_holds_objects(data) -> bool | None:
    """For an .npy array (by its magic): whether its dtype holds Python objects (a pickle); None if not an npy."""
    if not bytes(data[:6]) == NPY_MAGIC or len(data) < 10:
        return None
    major = data[6]
    if major == 1:
        (length,), start = struct.unpack_from("<H", data, 8), 10
    elif len(data) >= 12:
        (length,), start = struct.unpack_from("<I", data, 8), 12
    else:
        return True  # cut short: refuse rather than guess
    header = bytes(data[start : start + min(length, MAX_NPY_HEADER)]).decode("latin-1")
    return length > MAX_NPY_HEADER or _NPY_OBJECT.search(header) is not None


class _Budget:
    """How much zip content one file's examination may still read, across nested archives."""

    def __init__(self):
        self.members, self.bytes = 0, 0

    def spend(self, content: bytes) -> str | None:
        self.members += 1
        self.bytes += len(content)
        if self.members > MAX_MEMBERS or self.bytes > MAX_ZIP_BYTES:
            return f"a zip archive too large to examine for pickles (over {MAX_MEMBERS} members or {MAX_ZIP_BYTES} bytes)"
        return None


def hidden_pickle(data, *, scan_local_headers: bool) -> str | None:
    """The pickle `data` holds, in words, other than at its first byte: an npy of objects, a zip member."""
    return _contained(data, scan_local_headers, 0, _Budget())


def _examine(data, depth: int, budget: _Budget) -> str | None:
    stream = pickle_stream(data)
    return stream.describe() if stream is not None else _contained(data, True, depth, budget)


def _contained(data, scan_local_headers: bool, depth: int, budget: _Budget) -> str | None:
    if npy_holds_objects(data):
        return "a numpy array of Python objects (its data is a pickle)"
    if depth >= MAX_ZIP_DEPTH:
        return None
    members = _central_directory_members(data)
    if scan_local_headers:
        members = itertools.chain(members, _local_members(data))
    for member, content in members:
        too_much = budget.spend(content)
        if too_much:
            return too_much
        inner = _examine(content, depth + 1, budget)
        if inner is not None or member.lower().endswith(".pkl"):
            return f"a zip archive holding {inner or 'a pickle'} (member {member!r})"
    return None


def _central_directory_members(data):
    """(name, first bytes) of each member a zip reader finds through the central directory at the end of `data`."""
    if ZIP_END_RECORD not in data[-(65535 + 22) :]:
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else MapFile(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError, zlib.error):
        return
    with archive:
        for member in archive.infolist():
            yield member.filename, _member_start(archive, member)


def _member_start(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(member) as f:
            return f.read(MAX_MEMBER_BYTES)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError, zlib.error, RuntimeError):
        return b""  # unreadable (encrypted, damaged): its local header is still examined by the scan


def _local_members(data):
    """(name, first bytes) of each member found by a local header anywhere in `data` (stored or deflated)."""
    position = data.find(ZIP_LOCAL_HEADER)
    while position >= 0:
        member = _local_member(data, position)
        if member is not None:
            yield member
        position = data.find(ZIP_LOCAL_HEADER, position + 4)


def _local_member(data, position: int) -> tuple[str, bytes] | None:
    if position + 30 > len(data):
        return None
    _, _, _, method, _, _, _, compressed, _, name_length, extra_length = struct.unpack_from("<IHHHHHIIIHH", data, position)
    start = position + 30 + name_length + extra_length
    name = bytes(data[position + 30 : position + 30 + name_length]).decode("utf-8", "replace")
    # the size may be 0 here (given after the data): examine what follows, bounded, either way
    end = min(len(data), start + (compressed or MAX_MEMBER_BYTES), start + MAX_MEMBER_BYTES)
    raw = bytes(data[start:end])
    if method == 0:
        return name, raw
    if method == 8:
        try:
            return name, zlib.decompressobj(-15).decompress(raw, MAX_MEMBER_BYTES)
        except zlib.error:
            return name, b""
    return None


class MapFile(io.RawIOBase):
    """A read-only seekable file over a memory map, for zipfile (here and in wheel.py)."""

    def __init__(self, data: mmap.mmap):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, {0: offset, 1: self.pos + offset, 2: len(self.data) + offset}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        chunk = self.data[self.pos : self.pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def pickle_suffix(path: str) -> str | None:
    """The extension, if the name is one that pickle-based weights use."""
    suffix = Path(path.lower()).suffix
    return suffix if suffix in PICKLE_SUFFIXES else None
