"""The one JSON loader for untrusted bytes: size, depth and container count bounded before parsing.

`json.loads` recurses once per nesting level (`[` x 100 000 is a RecursionError) and builds
every object before anyone can look at it (a 100 MB document of `{}` is gigabytes of dicts).
So the document is measured first, in C-speed passes over its bytes, a piece at a time:
the strings are cut out (a bracket inside a string is not structure), then the brackets
left are counted and their deepest nesting found. Only a document within every bound is handed to `json.loads`.

Every failure is an `UnsafeJson` (a ValueError, like json's own errors) saying what is wrong;
callers turn it into a refusal naming their file.
"""

from __future__ import annotations

import json
from itertools import accumulate

MAX_DEPTH = 64

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_LEVEL = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_CHUNK = 1 << 20


class UnsafeJson(ValueError):
    """The bytes are not JSON sovpack will read: malformed, too large, too deep, or with a key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise UnsafeJson(f"the key {key!r} appears twice in one object")
        data[key] = value
    return data


def _not_json_constant(name: str):
    raise UnsafeJson(f"{name} is not a JSON value")


def _structure(raw: bytes):
    """The document's brackets outside strings, in pieces, in order (memory bounded by the piece size).

    Escapes are removed first (left to right, as the parser pairs backslashes), so every quote
    left opens or closes a string; where the document is valid, this agrees with the parser.
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    in_string = False
    for start in range(0, len(unescaped), _CHUNK):
        pieces = unescaped[start : start + _CHUNK].split(b'"')
        yield b"".join(pieces[1 if in_string else 0 :: 2]).translate(None, _NOT_BRACKETS)
        in_string ^= len(pieces) % 2 == 0


def _containers(raw: bytes) -> int:
    return sum(b.count(b"[") + b.count(b"{") for b in _structure(raw))


def _depth(raw: bytes) -> int:
    deepest = level = 0
    for brackets in _structure(raw):
        if brackets:
            levels = list(accumulate(map(_LEVEL.__getitem__, brackets), initial=level))
            deepest, level = max(deepest, max(levels)), levels[-1]
    return deepest


def loads(
    raw: bytes,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    max_containers: int | None = None,
    unique_keys: bool = True,
) -> object:
    """Parse UTF-8 JSON `raw` within the bounds given; raise UnsafeJson (or UnicodeDecodeError, a ValueError) otherwise.

    `max_containers` bounds the objects and arrays, hence the memory the parsed document takes.
    `unique_keys` refuses an object naming a key twice (formats where a second value could hide the first).
    NaN and Infinity, which Python's json accepts, are refused.
    """
    if len(raw) > max_bytes:
        raise UnsafeJson(f"{len(raw)} bytes, over the {max_bytes} byte limit")
    upper_bound = raw.count(b"[") + raw.count(b"{")  # brackets inside strings included
    if max_containers is not None and upper_bound > max_containers and (containers := _containers(raw)) > max_containers:
        raise UnsafeJson(f"it holds {containers} objects and arrays, over the limit of {max_containers}")
    if upper_bound > max_depth and (depth := _depth(raw)) > max_depth:
        raise UnsafeJson(f"it nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys if unique_keys else None,
            parse_constant=_not_json_constant,
        )
    except RecursionError:  # cannot happen within MAX_DEPTH; kept so that no input ever gives a traceback
        raise UnsafeJson("it nests too deeply") from None
