"""GGUF header validation, treating the file as untrusted input.

Reads the header, the metadata key/values and the tensor table, never the tensor data,
with every count and length bounded and every read checked against the file's length,
then checks the tensor table the way llama.cpp's loader does (offsets must be the padded
running sum, in declaration order). gguf-py's GGUFReader builds numpy views for every
array element (2.7 s for a 49k-token vocabulary here), too slow for a check that runs on
every verify and serve, so the reader is written here; the tables below are from the
GGUF specification (ggml/docs/gguf.md and ggml.h).
"""

from __future__ import annotations

import hashlib
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from sovpack.errors import FormatError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_ARRAY = 1 << 24
MAX_STRING = 64 << 20
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32

# value type id -> struct format for scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor type id -> (name, elements per block, bytes per block)
TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# general.file_type (llama_ftype) -> name as llama.cpp's quantize tool spells it
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}

UNQUANTIZED_FILE_TYPES = {"F32", "F16", "BF16"}

# Split GGUF files, as llama.cpp's gguf-split names them: MODEL-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class _Truncated(Exception):
    pass


class _Cursor:
    """Bounds-checked little-endian reads from a memory map."""

    def __init__(self, buf: mmap.mmap):
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Truncated(start)
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def u32(self) -> int:
        return self.unpack("<I")

    def u64(self) -> int:
        return self.unpack("<Q")

    def raw_string(self, limit: int = MAX_STRING) -> bytes:
        length = self.u64()
        if length > limit:
            raise ValueError(f"a string of {length} bytes at byte {self.pos - 8} exceeds the {limit} byte limit")
        start = self.take(length)
        return self.buf[start : start + length]

    def string(self, limit: int = MAX_STRING) -> str:
        raw = self.raw_string(limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"a string ending at byte {self.pos} is not valid UTF-8") from None


@dataclass
class _Value:
    """A metadata value: scalars and strings are kept; arrays are skipped, only counted."""

    value: object = None
    array_length: int | None = None


def _read_value(cur: _Cursor, vtype: int, key: str) -> _Value:
    if vtype in _SCALARS:
        return _Value(cur.unpack(_SCALARS[vtype]))
    if vtype == _STRING:
        return _Value(cur.string())
    if vtype != _ARRAY:
        raise ValueError(f"metadata key {key!r} has unknown value type {vtype}")
    etype, count = cur.u32(), cur.u64()
    if count > MAX_ARRAY:
        raise ValueError(f"metadata key {key!r} is an array of {count} elements, over the {MAX_ARRAY} limit")
    if etype in _SCALARS:
        cur.take(count * struct.calcsize(_SCALARS[etype]))
    elif etype == _STRING:
        _skip_strings(cur, count, key)
    else:
        raise ValueError(f"metadata key {key!r} is an array of type {etype}, which GGUF readers do not accept")
    return _Value(array_length=count)


_U64 = struct.Struct("<Q")


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Skip an array of strings (vocabularies: 10^5 entries) with bounds checks, in a tight loop."""
    buf, pos, end, unpack = cur.buf, cur.pos, len(cur.buf), _U64.unpack_from
    for _ in range(count):
        if pos + 8 > end:
            raise _Truncated(pos)
        (length,) = unpack(buf, pos)
        if length > MAX_STRING:
            raise ValueError(f"metadata key {key!r} holds a string of {length} bytes, which exceeds the {MAX_STRING} byte limit")
        pos += 8 + length
    if pos > end:
        raise _Truncated(end)
    cur.pos = pos


def _read_metadata(cur: _Cursor, kv_count: int) -> dict[str, _Value]:
    metadata: dict[str, _Value] = {}
    for _ in range(kv_count):
        key = cur.string(limit=65535)
        if key in metadata:
            raise ValueError(f"metadata key {key!r} appears twice")
        metadata[key] = _read_value(cur, cur.u32(), key)
    return metadata


@dataclass
class _Tensor:
    name: str
    type_name: str
    elements: int
    nbytes: int
    offset: int


def _read_tensor(cur: _Cursor) -> _Tensor:
    name = cur.string(limit=65535)
    n_dims = cur.u32()
    if not 1 <= n_dims <= MAX_DIMS:
        raise ValueError(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [cur.u64() for _ in range(n_dims)]
    ggml_type, offset = cur.u32(), cur.u64()
    if ggml_type not in TENSOR_TYPES:
        raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}")
    type_name, block, block_bytes = TENSOR_TYPES[ggml_type]
    if any(d == 0 or d >= 1 << 40 for d in dims):
        raise ValueError(f"tensor {name!r} has invalid dimensions {dims}")
    if dims[0] % block:
        raise ValueError(f"tensor {name!r}: row length {dims[0]} is not a multiple of the {type_name} block size {block}")
    elements = 1
    for d in dims:
        elements *= d
    if elements >= 1 << 48:
        raise ValueError(f"tensor {name!r} claims {elements} elements")
    return _Tensor(name, type_name, elements, elements // block * block_bytes, offset)


def _check_layout(tensors: list[_Tensor], data_start: int, file_size: int, alignment: int) -> None:
    """Offsets must be the running sum of padded tensor sizes, as llama.cpp's loader requires."""
    expected = 0
    seen = set()
    for t in tensors:
        if t.name in seen:
            raise ValueError(f"tensor name {t.name!r} appears twice")
        seen.add(t.name)
        if t.offset != expected:
            raise ValueError(f"tensor {t.name!r} has data offset {t.offset}, expected {expected} (overlap or gap)")
        expected += -(-t.nbytes // alignment) * alignment
    end = data_start + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if end > file_size:
        raise ValueError(f"tensor data ends at byte {end} but the file has only {file_size} bytes (truncated?)")
    if file_size - end > alignment:
        raise ValueError(f"{file_size - end} unexplained bytes follow the last tensor")


def _summary(version: int, metadata: dict[str, _Value], tensors: list[_Tensor]) -> dict:
    def scalar(key: str):
        v = metadata.get(key)
        return v.value if v is not None else None

    arch = scalar("general.architecture")
    file_type = scalar("general.file_type")
    types: dict[str, int] = {}
    for t in tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    templates = {
        key.removeprefix("tokenizer.chat_template").lstrip(".") or "default": hashlib.sha256(v.value.encode()).hexdigest()
        for key, v in metadata.items()
        if key.startswith("tokenizer.chat_template") and isinstance(v.value, str)
    }
    tokens = metadata.get("tokenizer.ggml.tokens")
    return {
        "gguf_version": version,
        "architecture": arch,
        "model_name": scalar("general.name"),
        "file_type": FILE_TYPES.get(file_type, f"unknown ({file_type})") if file_type is not None else None,
        "context_length": scalar(f"{arch}.context_length") if arch else None,
        "vocab_size": tokens.array_length if tokens else None,
        "tensor_count": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "parameter_count": sum(t.elements for t in tensors),
        "chat_template_sha256": templates.get("default"),
        "chat_templates": {k: v for k, v in sorted(templates.items()) if k != "default"} or None,
        "split": _split_info(metadata),
    }


def _split_info(metadata: dict[str, _Value]) -> dict | None:
    count = metadata.get("split.count")
    if count is None:
        return None
    number = metadata.get("split.no")
    return {"index": number.value if number else None, "count": count.value}


def _read(buf: mmap.mmap) -> tuple[int, dict[str, _Value], list[_Tensor]]:
    """Header, metadata and tensor table, every bound checked; raises ValueError/_Truncated."""
    cur = _Cursor(buf)
    if buf[:4] != MAGIC:
        raise ValueError(f"not a GGUF file: starts with {bytes(buf[:4])!r}, expected b'GGUF'")
    cur.take(4)
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count, kv_count = cur.u64(), cur.u64()
    if tensor_count > MAX_TENSORS or kv_count > MAX_KV:
        raise ValueError(f"implausible counts: {tensor_count} tensors, {kv_count} metadata keys")
    metadata = _read_metadata(cur, kv_count)
    tensors = [_read_tensor(cur) for _ in range(tensor_count)]
    alignment = metadata.get("general.alignment", _Value(DEFAULT_ALIGNMENT)).value
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise ValueError(f"general.alignment {alignment!r} is not a power of two up to 65536")
    data_start = -(-cur.pos // alignment) * alignment
    _check_layout(tensors, data_start, len(buf), alignment)
    return version, metadata, tensors


def _validated(path: Path) -> tuple[int, dict[str, _Value], list[_Tensor]]:
    """Read and validate a GGUF file; every problem becomes a FormatError naming it."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise FormatError(path, f"GGUF file is {size} bytes, too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _read(buf)
            except _Truncated as e:
                raise FormatError(
                    path, f"malformed GGUF: the header runs past the end of the file (at byte {e.args[0]})"
                ) from None
            except (ValueError, OverflowError, struct.error) as e:
                raise FormatError(path, f"malformed GGUF: {e}") from None


def inspect_gguf(path: Path) -> dict:
    """Validate a GGUF file's header and tensor table; return what a verifier records."""
    return _summary(*_validated(path))


def read_chat_template(path: Path) -> str | None:
    """The default chat template text, for serving exactly what was signed (the file is validated again)."""
    _, metadata, _ = _validated(path)
    value = metadata.get("tokenizer.chat_template")
    return value.value if value is not None and isinstance(value.value, str) else None
