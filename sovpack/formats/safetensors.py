"""safetensors header validation, treating the file as untrusted input.

Only the header is read, never the tensors. The `safetensors` library validates too, but
it reports failures without naming the tensor or field at fault and accepts duplicate
JSON keys; a verifier needs both, so the (small, fully specified) header is parsed here,
by the bounded JSON loader: at most MAX_TENSORS entries, so that a 100 MB header of empty
objects is refused before it becomes millions of Python objects.
Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor data.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from sovpack.common import safe_json
from sovpack.errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
MAX_RANK = 16
MAX_TENSORS = 1 << 18  # per file; the largest published models hold a few thousand per file

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _read_header(path: Path, file_size: int) -> tuple[dict, int]:
    if file_size < 8:
        raise FormatError(path, f"safetensors file is {file_size} bytes, too short for the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(path, f"safetensors header claims {header_len} bytes, over the {MAX_HEADER_BYTES} byte limit")
        if 8 + header_len > file_size:
            raise FormatError(
                path, f"safetensors header claims {header_len} bytes but the file has only {file_size - 8} after the length field"
            )
        raw = f.read(header_len)
    try:
        # a tensor entry is an object holding two arrays; plus the header and __metadata__
        header = safe_json.loads(raw, max_bytes=MAX_HEADER_BYTES, max_depth=8, max_containers=3 * MAX_TENSORS + 2)
    except ValueError as e:  # UnicodeDecodeError and UnsafeJson included
        raise FormatError(path, f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(path, f"safetensors header must be a JSON object, found {type(header).__name__}")
    return header, 8 + header_len


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(path, "safetensors '__metadata__' must be an object of strings")


def _tensor_extent(path: Path, name: str, info: object) -> tuple[int, int, str, int]:
    """(begin, end, dtype, element count) of one tensor entry, checked for consistency."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(path, f"{where} must have exactly the fields dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise FormatError(path, f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
        raise FormatError(path, f"{where} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise FormatError(path, f"{where} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    elements = math.prod(shape)
    if end < begin or end - begin != elements * DTYPE_BYTES[dtype]:
        raise FormatError(
            path,
            f"{where}: data_offsets {offsets} span {end - begin} bytes but "
            f"shape {shape} of {dtype} needs {elements * DTYPE_BYTES[dtype]}",
        )
    return begin, end, dtype, elements


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def inspect_safetensors(path: Path) -> dict:
    """Validate the header and return what it says: tensor count, dtypes, parameter count."""
    file_size = path.stat().st_size
    header, data_start = _read_header(path, file_size)
    if "__metadata__" in header:
        _check_metadata(path, header.pop("__metadata__"))
    extents = sorted((_tensor_extent(path, name, info), name) for name, info in header.items())
    dtypes: dict[str, int] = {}
    position = 0
    for (begin, end, dtype, _), name in extents:
        if begin < position:
            raise FormatError(path, f"tensor {name!r} at bytes {begin}-{end} overlaps the tensor before it")
        if begin > position:
            raise FormatError(path, f"tensor {name!r} starts at byte {begin}, leaving a gap after byte {position}")
        position = end
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    if data_start + position != file_size:
        raise FormatError(path, f"file length {file_size} disagrees with the header: tensors end at byte {data_start + position}")
    return {
        "tensor_count": len(extents),
        "dtypes": dict(sorted(dtypes.items())),
        "parameter_count": sum(e[0][3] for e in extents),
    }
