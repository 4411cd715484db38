"""Paths read from bundles, metadata and media are untrusted: only plain relative names pass."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from sovpack.errors import Refused

MAX_PATH = 1024
_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')


def unsafe_reason(path: str) -> str | None:
    """Why `path` may not name a file inside a bundle, or None when it is a safe relative path."""
    if not path or len(path) > MAX_PATH:
        return "empty or too long"
    if path.startswith("/"):
        return "absolute path"
    if _FORBIDDEN.search(path):
        return "control character, backslash or a character FAT32 and NTFS cannot store"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "empty, '.' or '..' component"
    if any(part != part.rstrip(" .") for part in parts):
        return "a component ends with a space or dot"
    return None


def check_safe_path(path: str, what: str = "path") -> str:
    reason = unsafe_reason(path)
    if reason:
        raise Refused(f"unsafe {what} {path!r}: {reason}")
    return str(PurePosixPath(path))


def case_collisions(paths: list[str]) -> list[tuple[str, str]]:
    """Pairs of paths that differ only by case: they would overwrite each other on FAT32 or NTFS."""
    seen: dict[str, str] = {}
    clashes = []
    for p in sorted(paths):
        key = p.casefold()
        if key in seen:
            clashes.append((seen[key], p))
        else:
            seen[key] = p
    return clashes
