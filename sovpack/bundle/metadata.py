"""sovpack.json: the bundle's identity and signed inventory (schema in docs/bundle-format.md)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sovpack.common import safe_json
from sovpack.common.hashing import FileDigest, shard_count
from sovpack.common.jsonfields import HEX64, JsonFields
from sovpack.common.safepath import case_collisions, check_safe_path
from sovpack.errors import Refused, UsageError

FORMAT = "sovpack-bundle"
FORMAT_VERSION = 1
METADATA_FILE = "sovpack.json"
SIGNATURES_DIR = "signatures"
RESERVED_NAMES = (METADATA_FILE, SIGNATURES_DIR)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MAX_ALLOWANCES = 100
_ALLOWANCE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
MAX_METADATA_BYTES = 64 * 1024 * 1024


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str
    shards: tuple[str, ...]
    role: str
    format: str
    details: dict | None = None  # what the format inspector found
    source: dict | None = None  # provenance: where the bytes came from

    @property
    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.sha256, self.shards)

    def to_json(self) -> dict:
        data: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "shards": list(self.shards),
            "role": self.role,
            "format": self.format,
        }
        if self.details is not None:
            data["details"] = self.details
        if self.source is not None:
            data["source"] = self.source
        return data


@dataclass
class BundleMetadata:
    name: str
    version: int
    created: datetime
    shard_size: int
    files: list[FileEntry]
    expires: datetime | None = None
    created_by: str = ""
    sources: list[dict] = field(default_factory=list)  # repos and commits a fetch resolved
    allowed_files: list[str] = field(default_factory=list)  # operator allowances: globs of files of no checked kind

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def size(self) -> int:
        """Bytes of all inventory files."""
        return sum(f.size for f in self.files)

    def is_expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def to_json(self) -> dict:
        data: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "created": format_time(self.created),
            "expires": format_time(self.expires) if self.expires else None,
            "created_by": self.created_by,
            "shard_size": self.shard_size,
            "sources": self.sources,
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.path)],
        }
        if self.allowed_files:  # only when used, so that other bundles still read with older sovpack versions
            data["allowed_files"] = self.allowed_files
        return data

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str, where: str) -> datetime:
    try:
        t = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError):
        raise Refused(f"{METADATA_FILE}: field {where!r} must be a UTC time like 2027-01-31T00:00:00Z, found {value!r}") from None
    return t.replace(tzinfo=timezone.utc)


def check_name(name: str, error: type[Exception] = Refused) -> str:
    """A bundle name read from a bundle is refused (Refused); one typed by a user is a usage error."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise error(
            f"bundle name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _parse_file(data: object, index: int, shard_size: int) -> FileEntry:
    f = JsonFields(
        data, METADATA_FILE, f"files[{index}]", {"path", "size", "sha256", "shards", "role", "format", "details", "source"}
    )
    path = check_safe_path(f.get("path", str), "file path in " + METADATA_FILE)
    size, sha256, shards = f.get("size", int), f.get("sha256", str), f.get("shards", list)
    if size < 0 or not HEX64.match(sha256) or not all(isinstance(s, str) and HEX64.match(s) for s in shards):
        raise Refused(f"{METADATA_FILE}: entry for {path} has an invalid size or digest")
    if len(shards) != shard_count(size, shard_size):
        raise Refused(
            f"{METADATA_FILE}: entry for {path} lists {len(shards)} shard "
            f"digests, expected {shard_count(size, shard_size)} for {size} bytes"
        )
    source = f.get("source", dict, optional=True)
    if source is not None and not isinstance(source.get("type"), str):
        raise Refused(f"{METADATA_FILE}: entry for {path} has a source without a 'type'")
    return FileEntry(
        path, size, sha256, tuple(shards), f.get("role", str), f.get("format", str), f.get("details", dict, optional=True), source
    )


def parse_metadata(raw: bytes) -> BundleMetadata:
    """Parse and validate sovpack.json; every problem is a Refused naming the field."""
    try:
        data = safe_json.loads(raw, max_bytes=MAX_METADATA_BYTES)
    except ValueError as e:  # UnicodeDecodeError and UnsafeJson included
        raise Refused(f"{METADATA_FILE} is not valid JSON: {e}") from None
    top = JsonFields(
        data,
        METADATA_FILE,
        "",
        {
            "format",
            "format_version",
            "name",
            "version",
            "created",
            "expires",
            "created_by",
            "shard_size",
            "sources",
            "files",
            "allowed_files",
        },
    )
    if top.get("format", str) != FORMAT:
        raise Refused(f"{METADATA_FILE}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    if top.get("format_version", int) != FORMAT_VERSION:
        raise Refused(
            f"{METADATA_FILE}: format_version {data['format_version']} is not "
            f"supported by this sovpack (it reads version {FORMAT_VERSION})"
        )
    version, shard_size = top.get("version", int), top.get("shard_size", int)
    if version < 1 or shard_size < 1 << 20 or shard_size & (shard_size - 1):
        raise Refused(f"{METADATA_FILE}: version must be >= 1 and shard_size a power of two >= 1 MiB")
    files = [_parse_file(item, i, shard_size) for i, item in enumerate(top.get("files", list))]
    check_inventory_paths([f.path for f in files])
    expires = top.get("expires", str, optional=True)
    return BundleMetadata(
        name=check_name(top.get("name", str)),
        version=version,
        created=parse_time(top.get("created", str), "created"),
        expires=parse_time(expires, "expires") if expires else None,
        created_by=top.get("created_by", str),
        shard_size=shard_size,
        sources=top.get("sources", list),
        files=files,
        allowed_files=check_allowances(top.get("allowed_files", list, optional=True) or [], Refused),
    )


def check_allowances(globs: list, error: type[Exception] = UsageError) -> list[str]:
    """Operator allowances (--allow-file GLOB): up to 100 globs of 1-200 printable characters, no duplicates."""
    where = "--allow-file" if error is UsageError else f"{METADATA_FILE}: field 'allowed_files'"
    if len(globs) > MAX_ALLOWANCES:
        raise error(f"{where}: {len(globs)} allowances, over the limit of {MAX_ALLOWANCES}")
    for glob in globs:
        if not isinstance(glob, str) or not _ALLOWANCE.match(glob):
            raise error(f"{where}: {glob!r} is not a glob of 1-200 printable characters")
    if len(set(globs)) != len(globs):
        raise error(f"{where} names the same glob twice")
    return list(globs)


def check_inventory_paths(paths: list[str]) -> None:
    if len(set(paths)) != len(paths):
        raise Refused(f"{METADATA_FILE} lists the same file twice")
    by_folded = {p.casefold(): p for p in paths}
    for p in paths:
        parts = p.split("/")
        for depth in range(1, len(parts)):
            folder = by_folded.get("/".join(parts[:depth]).casefold())
            if folder is not None:
                raise Refused(
                    f"{METADATA_FILE} lists {folder} as a file and {p} inside it as if it were a directory; "
                    "one path cannot be both"
                )
    for p in paths:
        if p.split("/")[0] in RESERVED_NAMES:
            raise Refused(f"{METADATA_FILE} lists {p}, a name reserved for sovpack's own files")
    for a, b in case_collisions(paths):
        raise Refused(f"{METADATA_FILE} lists {a} and {b}, which differ only by case and would collide on FAT32/NTFS media")


def parse_expiry(text: str | None, now: datetime) -> datetime | None:
    """`90d` (days from now), `2027-01-01` (midnight UTC) or `2027-01-01T12:00:00Z`."""
    if not text:
        return None
    if re.fullmatch(r"\d{1,5}d", text):
        return now + timedelta(days=int(text[:-1]))
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    raise UsageError(f"--expires {text!r}: give a number of days like 90d, a date like 2027-01-01, or 2027-01-01T00:00:00Z")
