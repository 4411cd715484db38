"""Plain text (Markdown, licences, Jinja templates, vocabularies) and JSON, recognised by their bytes.

Text is UTF-8 (a byte-order mark allowed) without NUL or other control characters than
tab, line feed, carriage return and form feed: what editors write and what binary formats,
pickles of protocol 1 and up and zip archives never are. JSON is text that the bounded loader
(common/safe_json.py) reads as an object or an array.
"""

from __future__ import annotations

import codecs
import re

from sovpack.common import safe_json

_CHUNK = 1 << 20
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")
MAX_JSON_BYTES = 256 << 20  # tokenizer.json of the largest vocabularies is tens of MB
MAX_JSON_DEPTH = 256


def text_problem(data) -> str | None:
    """Why `data` is not plain text (in words), or None when it is."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        control = _CONTROL.search(chunk)
        if control:
            return f"control byte 0x{control.group()[0]:02X} at byte {start + control.start()}"
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            return f"invalid UTF-8 at byte {start + e.start}"
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "invalid UTF-8 at its end"
    return None


def is_json_document(data) -> bool:
    """Whether text `data` is a JSON object or array sovpack's bounded loader reads."""
    head = bytes(data[:64]).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] not in (b"{", b"["):
        return False
    try:
        raw = bytes(data).removeprefix(b"\xef\xbb\xbf")
        safe_json.loads(raw, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH, unique_keys=False)
    except ValueError:
        return False
    return True
