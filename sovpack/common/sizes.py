"""Byte sizes as people write them on the command line and read them in messages."""

from __future__ import annotations

import re

from sovpack.errors import UsageError

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str) -> int:
    """`700M`, `4G`, `4.7G` (decimal, as media are labelled), `4GiB`/`512Mi` (binary), or bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"{option} {text!r}: give bytes or a size like 700M, 4G, 4.7G or 512MiB")
    number, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    if unit:
        return int(number * (1024 if binary else 1000) ** ("KMGT".index(unit) + 1))
    if binary or not number.is_integer():
        raise UsageError(f"{option} {text!r}: a size without a unit is a whole number of bytes")
    return int(number)


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
