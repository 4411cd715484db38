"""Typed access to objects of untrusted JSON documents (sovpack.json, export indexes)."""

from __future__ import annotations

import re

from sovpack.errors import Refused

HEX64 = re.compile(r"^[0-9a-f]{64}$")


class JsonFields:
    """One JSON object; every problem is a Refused naming the document (`source`) and the field."""

    def __init__(self, data: object, source: str, where: str = "", allowed: set[str] | None = None):
        self.data, self.source, self.where = data, source, where
        what = where or "the top level"
        if not isinstance(data, dict):
            raise Refused(f"{source}: {what} must be a JSON object")
        unknown = set(data) - allowed if allowed is not None else set()
        if unknown:
            raise Refused(f"{source}: {what} has unknown field(s) {', '.join(sorted(unknown))}")

    def field_name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, *, optional: bool = False):
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise Refused(f"{self.source}: field {self.field_name(key)!r} is missing or not of type {kind.__name__}")
        return value

    def count(self, key: str) -> int:
        value = self.get(key, int)
        if value < 0:
            raise Refused(f"{self.source}: field {self.field_name(key)!r} is negative")
        return value

    def digest(self, key: str) -> str:
        value = self.get(key, str)
        if not HEX64.match(value):
            raise Refused(f"{self.source}: field {self.field_name(key)!r} is not a SHA-256 hex digest")
        return value
