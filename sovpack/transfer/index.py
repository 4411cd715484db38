"""The export index: the volumes of one export on media, and the index file describing them.

An export of bundle NAME version V is, in one directory (docs/transfer.md):

    NAME-vV.001, NAME-vV.002, ...  consecutive pieces of one POSIX (pax) tar stream of the bundle
    NAME-vV.index.json              the bundle's identity and, per volume, its size and SHA-256
    NAME-vV.index.sig               optional: model-signing signature over the index and the volumes

Volume checks live in volume_check.py (each volume on its own) and stream_check.py (as import
reads them once). Volumes and indexes come from untrusted media: every field is validated, and
the bundle's own signatures, checked after reassembly, are what decide.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sovpack.bundle.metadata import BundleMetadata, check_name, format_time
from sovpack.bundle.signature import build_statement, parse_statement, read_signature_file, sign_statement
from sovpack.bundle.trust import TrustPolicy
from sovpack.common import safe_json
from sovpack.common.hashing import sha256_bytes
from sovpack.common.jsonfields import JsonFields
from sovpack.common.safepath import check_safe_path
from sovpack.common.sizes import parse_size
from sovpack.errors import Refused, UsageError

INDEX_FORMAT = "sovpack-export"
INDEX_FORMAT_VERSION = 1
INDEX_SUFFIX = ".index.json"
INDEX_SIGNATURE_SUFFIX = ".index.sig"
MAX_INDEX_BYTES = 64 * 1024 * 1024
DEFAULT_VOLUME_SIZE = 4095 * 1024 * 1024  # just under FAT32's 4 GiB - 1 byte file size limit
MIN_VOLUME_SIZE = 4096
_VOLUME_NAME = re.compile(r"^(?P<stem>.+)\.(?P<number>[0-9]{3,})$")


def parse_volume_size(text: str) -> int:
    """`4G`, `700M`, `4.7G` (decimal, as media are labelled), `4GiB`/`512Mi` (binary), or bytes."""
    size = parse_size(text, "--volume-size")
    if size < MIN_VOLUME_SIZE:
        raise UsageError(f"--volume-size {text!r} is below the minimum of {MIN_VOLUME_SIZE} bytes")
    return size


def volume_name(stem: str, number: int) -> str:
    return f"{stem}.{number:03d}"


def volume_stem(file_name: str) -> str | None:
    """The stem of a volume's file name (NAME-vV of NAME-vV.001), None for any other name."""
    match = _VOLUME_NAME.match(file_name)
    return match["stem"] if match else None


def index_name(stem: str) -> str:
    return stem + INDEX_SUFFIX


def index_signature_name(stem: str) -> str:
    return stem + INDEX_SIGNATURE_SUFFIX


@dataclass(frozen=True)
class FileRef:
    """A bundle file as the index lists it."""

    path: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class BundleIdentity:
    name: str
    version: int
    metadata_sha256: str  # SHA-256 of the signed sovpack.json: what makes this bundle this bundle
    created: str
    expires: str | None
    size: int  # bytes of all inventory files

    @classmethod
    def of(cls, metadata: BundleMetadata, raw: bytes) -> "BundleIdentity":
        """The identity of the bundle whose sovpack.json is `raw` (parsed: `metadata`)."""
        expires = format_time(metadata.expires) if metadata.expires else None
        return cls(metadata.name, metadata.version, sha256_bytes(raw), format_time(metadata.created), expires, metadata.size)

    @property
    def stem(self) -> str:
        """NAME-vVERSION: the volumes' file name stem and the tar stream's top directory."""
        return f"{self.name}-v{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "metadata_sha256": self.metadata_sha256,
            "created": self.created,
            "expires": self.expires,
            "size": self.size,
        }


@dataclass(frozen=True)
class VolumeEntry:
    file: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "size": self.size, "sha256": self.sha256}


@dataclass
class ExportIndex:
    bundle: BundleIdentity
    archive_size: int  # bytes of the whole tar stream: the sum of the volume sizes
    volume_size: int
    volumes: list[VolumeEntry]
    files: list[FileRef]  # the bundle's whole inventory: what the secure side holds once imported
    left_out: list[FileRef] = field(default_factory=list)  # delta export: files taken from the store
    since: dict | None = None  # identity of the export or bundle the delta was made against
    created: str = ""
    created_by: str = ""

    def to_bytes(self) -> bytes:
        doc = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "created": self.created,
            "created_by": self.created_by,
            "bundle": self.bundle.to_json(),
            "archive": {"format": "posix tar (pax)", "top": self.bundle.stem, "size": self.archive_size},
            "volume_size": self.volume_size,
            "volumes": [v.to_json() for v in self.volumes],
            "files": [f.to_json() for f in self.files],
            "left_out": [f.to_json() for f in self.left_out],
            "since": self.since,
        }
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---- reading an index from untrusted media


def parse_index(raw: bytes, source: str) -> ExportIndex:
    """Parse and validate an index file; every problem is a Refused naming `source` and the field."""
    try:
        data = safe_json.loads(raw, max_bytes=MAX_INDEX_BYTES)
    except ValueError as e:  # UnicodeDecodeError and UnsafeJson included
        raise Refused(f"{source} is not a sovpack export index (invalid JSON: {e})") from None
    top = JsonFields(data, source)
    if top.get("format", str) != INDEX_FORMAT or top.get("format_version", int) != INDEX_FORMAT_VERSION:
        raise Refused(
            f"{source}: format {data.get('format')!r} version {data.get('format_version')!r} is not "
            f"{INDEX_FORMAT} version {INDEX_FORMAT_VERSION}"
        )
    b = JsonFields(top.get("bundle", dict), source, "bundle")
    try:
        name = check_name(b.get("name", str))
    except Refused as e:
        raise Refused(f"{source}: {e}") from None
    bundle = BundleIdentity(
        name,
        b.count("version"),
        b.digest("metadata_sha256"),
        b.get("created", str),
        b.get("expires", str, optional=True),
        b.count("size"),
    )
    volumes = [_parse_volume(v, i, source) for i, v in enumerate(top.get("volumes", list))]
    for number, v in enumerate(volumes, start=1):
        if v.file != volume_name(bundle.stem, number):
            raise Refused(f"{source}: volume {number} is named {v.file!r}, expected {volume_name(bundle.stem, number)!r}")
    archive = JsonFields(top.get("archive", dict), source, "archive")
    archive_size = archive.count("size")
    if archive_size != sum(v.size for v in volumes):
        raise Refused(f"{source}: the archive size {archive_size} is not the sum of its volumes' sizes")
    return ExportIndex(
        bundle=bundle,
        archive_size=archive_size,
        volume_size=top.count("volume_size"),
        volumes=volumes,
        files=[_parse_file(f, f"files[{i}]", source) for i, f in enumerate(top.get("files", list))],
        left_out=[_parse_file(f, f"left_out[{i}]", source) for i, f in enumerate(top.get("left_out", list))],
        since=top.get("since", dict, optional=True),
        created=top.get("created", str),
        created_by=top.get("created_by", str),
    )


def _parse_volume(data: object, i: int, source: str) -> VolumeEntry:
    v = JsonFields(data, source, f"volumes[{i}]")
    return VolumeEntry(v.get("file", str), v.count("size"), v.digest("sha256"))


def _parse_file(data: object, where: str, source: str) -> FileRef:
    f = JsonFields(data, source, where)
    return FileRef(check_safe_path(f.get("path", str), f"path in {source}"), f.count("size"), f.digest("sha256"))


def find_index(path: Path, hint: str = "give the directory holding the volumes, or their index file") -> Path:
    """The index named, or the only index in a directory; `hint` (what the caller accepts) ends a usage error."""
    if path.is_file():
        if not path.name.endswith(INDEX_SUFFIX):
            raise UsageError(f"{path} is not an export index (*{INDEX_SUFFIX}); {hint}")
        return path
    if not path.is_dir():
        raise UsageError(f"{path} does not exist; {hint}")
    indexes = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX) and p.is_file())
    if not indexes:
        raise UsageError(f"{path} holds no export index (*{INDEX_SUFFIX}): copy it from the media together with the volumes")
    if len(indexes) > 1:
        raise UsageError(
            f"{path} holds the indexes of {len(indexes)} exports ({', '.join(p.name for p in indexes)}); "
            "give the index file of the one to use"
        )
    return indexes[0]


def read_index(path: Path) -> tuple[ExportIndex, bytes]:
    """The index at `path` and its bytes; refused when it, or a volume it lists, is a link (media hold only files)."""
    _refuse_link(path)
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise Refused(f"{path.name} is larger than {MAX_INDEX_BYTES} bytes; not an export index")
    raw = path.read_bytes()
    index = parse_index(raw, path.name)
    if path.name != index_name(index.bundle.stem):
        raise Refused(
            f"{path.name} describes {index.bundle.label}, whose index is named {index_name(index.bundle.stem)}; "
            "it was renamed or belongs to another export"
        )
    for volume in index.volumes:
        _refuse_link(path.parent / volume.file)
    return index, raw


def _refuse_link(path: Path) -> None:
    """A symbolic link on media would let an export read bytes from anywhere on the importing machine."""
    if path.is_symlink():
        raise Refused(f"{path.name} in {path.parent} is a symbolic link; export media must hold the files themselves")


# ---- signing the index


def index_resources(index: ExportIndex, raw_index: bytes) -> dict[str, str]:
    """What an index signature signs: the index file and every volume, by SHA-256."""
    return {index_name(index.bundle.stem): sha256_bytes(raw_index)} | {v.file: v.sha256 for v in index.volumes}


def sign_index(private_key, index: ExportIndex, raw_index: bytes) -> bytes:
    """A model-signing signature over the index and every volume (so `model_signing verify key` accepts the export)."""
    return sign_statement(private_key, build_statement(index_subject(index), index_resources(index, raw_index)))


def index_subject(index: ExportIndex) -> str:
    """The subject an index signature names: NAME-vV export."""
    return f"{index.bundle.stem} export"


def check_index_signature(directory: Path, index: ExportIndex, raw_index: bytes, policy: TrustPolicy | None) -> str:
    """Describe the index signature; Refused when it exists but does not cover this very index."""
    name = index_signature_name(index.bundle.stem)
    path = directory / name
    if not path.is_file():
        return "index not signed"
    _refuse_link(path)
    sig = read_signature_file(path, name)
    statement = parse_statement(sig.payload, name)
    if statement.subject_name != index_subject(index):
        raise Refused(
            f"{name} signs a statement whose subject is {statement.subject_name!r}, not {index_subject(index)!r}: "
            "it was made for another export"
        )
    if statement.resources != index_resources(index, raw_index):
        raise Refused(
            f"{name} does not cover this {index_name(index.bundle.stem)}: the index was edited after it was "
            "signed, or the signature belongs to another export"
        )
    signer = policy.key_for(sig.key_hint) if policy else None
    if signer is None:
        return f"index signed by key {sig.key_id}, which is not in the trust set (signature not checked)"
    if not sig.verify(signer.public_key):
        raise Refused(
            f"{name} names trusted signer {signer.label} but does not verify: the index signature was forged or altered"
        )
    return f"index signed by {signer.label}"
