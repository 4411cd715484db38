"""Python wheels (PEP 427), recognised by their bytes: the one kind that installs code.

A wheel is carried only under an explicit operator allowance (the runtime bundle is packed with
`wheels/*.whl`, formats/gate.py). What makes a file one, every part read with bounds:

- a zip archive from its first byte (a local header at byte 0: no bytes in front) to its end
  record, read through its central directory as pip reads it;
- exactly one top-level `NAME-VERSION.dist-info/` directory, holding `WHEEL` and `RECORD`;
- `WHEEL`: e-mail style headers with `Wheel-Version: 1.x`, `Root-Is-Purelib: true|false` and
  at least one `Tag` (python-abi-platform);
- `RECORD`: CSV rows of path, hash and size, listing `WHEEL` and itself;
- for a bundle path ending in `.whl`: the file name's distribution is the dist-info directory's.

Its members are not searched for pickles once it is allowed: a wheel installs code, which is
strictly more than a pickle can do (numpy ships a test .pkl). A zip that only looks like a wheel
gets no such exemption.
"""

from __future__ import annotations

import csv
import email.parser
import io
import re
import struct
import zipfile
import zlib
from pathlib import PurePosixPath

from sovpack.errors import FormatError
from sovpack.formats.pickle import ZIP_END_RECORD, ZIP_LOCAL_HEADER, MapFile

ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_END_RECORD = b"PK\x06\x06"
MAX_MEMBERS = 200_000  # the largest wheels (torch) hold tens of thousands of files
MAX_CENTRAL_DIRECTORY = 64 << 20
MAX_WHEEL_FILE = 64 << 10  # dist-info/WHEEL is a few lines
MAX_RECORD = 64 << 20

_DIST_INFO_WHEEL = re.compile(r"^[^/]+\.dist-info/WHEEL$")
_TAG = re.compile(r"^[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+$")


class _Malformed(ValueError):
    pass


def looks_like_wheel(data) -> bool:
    """A zip from byte 0 whose central directory lists a top-level *.dist-info/WHEEL (not yet validated)."""
    if bytes(data[:4]) != ZIP_LOCAL_HEADER:
        return False
    try:
        with _open_zip(data) as archive:
            return any(_DIST_INFO_WHEEL.match(name) for name in archive.namelist())
    except _Malformed:
        return False


def inspect_wheel(data, name: str) -> dict:
    """The wheel's distribution, version, wheel version and tags; FormatError naming `name` if it is not a valid wheel."""
    try:
        return _inspect(data, name)
    except _Malformed as e:
        raise FormatError(name, f"refused: it is not a valid Python wheel ({e})") from None


def _inspect(data, name: str) -> dict:
    if bytes(data[:4]) != ZIP_LOCAL_HEADER:
        raise _Malformed("it does not start with a zip member")
    with _open_zip(data) as archive:
        members = archive.infolist()
        if min((m.header_offset for m in members), default=None) != 0:
            raise _Malformed("its zip members do not start at its first byte")
        dist_info = _dist_info(members)
        wheel = _parse_wheel_file(_read(archive, f"{dist_info}/WHEEL", MAX_WHEEL_FILE))
        _check_record(_read(archive, f"{dist_info}/RECORD", MAX_RECORD), dist_info)
    distribution, _, version = dist_info.removesuffix(".dist-info").partition("-")
    if not distribution or not version:
        raise _Malformed(f"its directory {dist_info}/ is not named NAME-VERSION.dist-info")
    file_name = PurePosixPath(name).name
    if file_name.lower().endswith(".whl") and _canonical(file_name.split("-")[0]) != _canonical(distribution):
        raise _Malformed(f"its file name names the distribution {file_name.split('-')[0]!r}, but it holds {dist_info}/")
    return {"distribution": distribution, "version": version, "members": len(members)} | wheel


def _open_zip(data) -> zipfile.ZipFile:
    """The archive, after its end record says how large its central directory is (zipfile reads all of it)."""
    entries, size = _central_directory_extent(data)
    if entries > MAX_MEMBERS or size > MAX_CENTRAL_DIRECTORY:
        raise _Malformed(f"its zip directory lists {entries} members in {size} bytes, over the limits")
    try:
        return zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else MapFile(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError, struct.error) as e:
        raise _Malformed(f"its zip directory cannot be read: {e}") from None


def _central_directory_extent(data) -> tuple[int, int]:
    """(members, bytes) of the central directory, from the end record (zip64 included); the record must end the file."""
    tail = max(0, len(data) - (65535 + 22))
    position = data.rfind(ZIP_END_RECORD, tail)
    if position < 0 or position + 22 > len(data):
        raise _Malformed("no zip end record")
    entries, size, _, comment = struct.unpack_from("<HIIH", data, position + 10)
    if position + 22 + comment != len(data):
        raise _Malformed("bytes follow its zip end record")
    if entries == 0xFFFF or size == 0xFFFFFFFF:
        locator = position - 20
        if locator < 0 or bytes(data[locator : locator + 4]) != ZIP64_LOCATOR:
            raise _Malformed("a zip64 end record is announced but missing")
        (record,) = struct.unpack_from("<Q", data, locator + 8)
        if record + 56 > len(data) or bytes(data[record : record + 4]) != ZIP64_END_RECORD:
            raise _Malformed("a zip64 end record is announced but missing")
        entries, size = struct.unpack_from("<QQ", data, record + 32)
    return entries, size


def _dist_info(members: list[zipfile.ZipInfo]) -> str:
    directories = sorted({m.filename.split("/")[0] for m in members if m.filename.split("/")[0].endswith(".dist-info")})
    if len(directories) != 1:
        raise _Malformed(f"it has {len(directories)} top-level .dist-info directories, not one")
    names = {m.filename for m in members}
    for required in ("WHEEL", "RECORD"):
        if f"{directories[0]}/{required}" not in names:
            raise _Malformed(f"it has no {directories[0]}/{required}")
    return directories[0]


def _read(archive: zipfile.ZipFile, member: str, limit: int) -> str:
    info = archive.getinfo(member)
    if info.file_size > limit:
        raise _Malformed(f"{member} is {info.file_size} bytes, over the limit of {limit}")
    try:
        with archive.open(info) as f:
            raw = f.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError, RuntimeError, zlib.error) as e:
        raise _Malformed(f"{member} cannot be read: {e}") from None
    if len(raw) > limit:
        raise _Malformed(f"{member} holds more than {limit} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{member} is not UTF-8 text") from None


def _parse_wheel_file(text: str) -> dict:
    headers = email.parser.HeaderParser().parsestr(text)
    version = headers.get("Wheel-Version", "")
    if not re.fullmatch(r"1\.\d{1,4}", version.strip()):
        raise _Malformed(f"its WHEEL file gives Wheel-Version {version.strip()!r}, not 1.x")
    purelib = headers.get("Root-Is-Purelib", "").strip().lower()
    if purelib not in ("true", "false"):
        raise _Malformed("its WHEEL file has no Root-Is-Purelib: true or false")
    tags = [t.strip() for t in headers.get_all("Tag", [])]
    if not tags or not all(_TAG.match(t) for t in tags):
        raise _Malformed("its WHEEL file has no Tag, or a Tag that is not python-abi-platform")
    return {"wheel_version": version.strip(), "root_is_purelib": purelib == "true", "tags": tags}


def _check_record(text: str, dist_info: str) -> None:
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise _Malformed(f"its RECORD is not CSV: {e}") from None
    listed = set()
    for number, row in enumerate(rows, 1):
        if len(row) != 3 or not row[0]:
            raise _Malformed(f"line {number} of its RECORD is not path,hash,size")
        listed.add(row[0])
    for required in ("WHEEL", "RECORD"):
        if f"{dist_info}/{required}" not in listed:
            raise _Malformed(f"its RECORD does not list {dist_info}/{required}")


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()
