"""Images for model cards (PNG, JPEG, GIF, WebP), recognised by magic and walked by structure.

Each is walked from its signature to its end marker with every length checked against the
bytes left, and nothing may follow the end: bytes after an image's end are where polyglots
(a zip, a pickle) hide. Pixel data is not decoded.
"""

from __future__ import annotations

import struct

from sovpack.errors import FormatError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 64 << 20


class _Malformed(ValueError):
    pass


def image_type(data) -> str | None:
    """png, jpeg, gif or webp by the file's magic bytes; None for anything else."""
    head = bytes(data[:12])
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _png(data) -> tuple[int, int]:
    pos, size = len(PNG_SIGNATURE), None
    while True:
        if pos + 12 > len(data):
            raise _Malformed(f"a chunk at byte {pos} runs past the end (no IEND)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 1 << 31 or end > len(data):
            raise _Malformed(f"chunk {kind!r} at byte {pos} claims {length} bytes, past the end")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise _Malformed("the first chunk is not IHDR")
            size = struct.unpack_from(">II", data, pos + 8)
        if kind == b"IEND":
            _nothing_after(data, end)
            return size
        pos = end


def _jpeg(data) -> tuple[int, int]:
    pos, size = 2, None
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise _Malformed(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image
            _nothing_after(data, pos + 2)
            if size is None:
                raise _Malformed("it has no frame header")
            return size
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if pos + 4 > len(data):
            raise _Malformed(f"segment at byte {pos} is cut short")
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise _Malformed(f"segment 0x{marker:02X} at byte {pos} runs past the end")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and length >= 7:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker that is not a stuffed 0xFF00 or restart
            end = _end_of_scan(data, end)
        pos = end


def _end_of_scan(data, pos: int) -> int:
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            raise _Malformed("the scan data runs past the end (no end-of-image marker)")
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
            continue
        return pos


def _gif(data) -> tuple[int, int]:
    if len(data) < 13:
        raise _Malformed("the header is cut short")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while True:
        if pos >= len(data):
            raise _Malformed("it ends without its trailer (0x3B)")
        block = data[pos]
        if block == 0x3B:
            _nothing_after(data, pos + 1)
            return width, height
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor, optional local colour table, LZW minimum code size, sub-blocks
            if pos + 10 > len(data):
                raise _Malformed(f"image descriptor at byte {pos} is cut short")
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _sub_blocks(data, pos + 1)
        else:
            raise _Malformed(f"unknown block 0x{block:02X} at byte {pos}")


def _sub_blocks(data, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise _Malformed("a data sub-block runs past the end")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


def _webp(data) -> None:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if riff_size + 8 != len(data):
        raise _Malformed(f"the RIFF size says {riff_size + 8} bytes, the file has {len(data)}")
    pos, chunks = 12, 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise _Malformed(f"chunk at byte {pos} is cut short")
        kind, length = struct.unpack_from("<4sI", data, pos)
        pos += 8 + length + (length & 1)
        if pos > len(data):
            raise _Malformed(f"chunk {kind!r} runs past the end")
        chunks += 1
    if not chunks:
        raise _Malformed("it holds no chunk")
    return None  # dimensions live in format-specific chunk layouts; not needed to check the structure


def _nothing_after(data, end: int) -> None:
    if end != len(data):
        raise _Malformed(f"{len(data) - end} bytes follow the end of the image")


_WALKERS = {"png": _png, "jpeg": _jpeg, "gif": _gif, "webp": _webp}


def inspect_image(data, name: str) -> dict:
    """Walk an image's structure; its type and size, or a FormatError naming `name`."""
    kind = image_type(data)
    if len(data) > MAX_IMAGE_BYTES:
        raise FormatError(name, f"{kind} image of {len(data)} bytes, over the {MAX_IMAGE_BYTES} byte limit for card images")
    try:
        size = _WALKERS[kind](data)
    except (_Malformed, struct.error) as e:
        raise FormatError(name, f"malformed {kind.upper()} image: {e}") from None
    return {"image": kind} | ({"width": size[0], "height": size[1]} if size else {})
