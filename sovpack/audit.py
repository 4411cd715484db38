"""The store's append-only audit log: JSON lines, each carrying the SHA-256 of the line before.

Editing, inserting or deleting a line breaks the chain and `verify_chain` names the first
line at fault. Removing lines from the end cannot be detected from the log alone: the
head digest that `verify_chain` returns is what an operator records elsewhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack.errors import Refused
from sovpack.metadata import format_time

GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainStatus:
    records: int
    head: str  # SHA-256 of the last line: note it down to detect truncation later


class AuditLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, event: str, **fields) -> dict:
        """Append one record atomically with respect to other sovpack processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _end_cut_line(f)
            last = _last_line(f)
            record = {
                "seq": _next_seq(f, last),
                "time": format_time(datetime.now(timezone.utc)),
                "event": event,
                **fields,
                "prev": hashlib.sha256(last).hexdigest() if last else GENESIS,
            }
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise Refused(f"{self.path}: line {number} is not an audit record (see `sovpack audit verify`)")
            records.append(record)
        return records

    def verify_chain(self) -> ChainStatus:
        """Check every link; raise Refused naming the first broken line."""
        if not self.path.exists():
            return ChainStatus(0, GENESIS)
        previous, expected_prev = None, GENESIS
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1] != b"":
            raise Refused(f"{self.path}: the last line is incomplete (a write was cut off or the file was edited)")
        for number, line in enumerate(lines[:-1], start=1):
            try:
                record = json.loads(line)
                seq, prev = record["seq"], record["prev"]
            except (ValueError, KeyError, TypeError):
                raise Refused(f"{self.path}: line {number} is not an audit record") from None
            if prev != expected_prev or seq != number:
                raise Refused(
                    f"{self.path}: the chain breaks at line {number} (seq {seq}): line {number - 1 or 'start'} "
                    "was edited, or lines were inserted or deleted"
                )
            previous, expected_prev = line, hashlib.sha256(line).hexdigest()
        return ChainStatus(len(lines) - 1, expected_prev if previous is not None else GENESIS)


def _last_line(f) -> bytes | None:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return None
    block = min(size, 1 << 16)
    while True:
        f.seek(size - block)
        tail = f.read(block).rstrip(b"\n")
        if b"\n" in tail or block == size:
            return tail.rsplit(b"\n", 1)[-1]
        block = min(size, block * 4)


def _end_cut_line(f) -> None:
    """A write cut off by a crash leaves a line without its newline: close it, so the next record stays whole."""
    size = f.seek(0, os.SEEK_END)
    if size:
        f.seek(size - 1)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _next_seq(f, last: bytes | None) -> int:
    if not last:
        return 1
    try:
        return int(json.loads(last)["seq"]) + 1
    except (ValueError, KeyError, TypeError):  # the last line was tampered with: count lines instead
        f.seek(0)
        return sum(1 for _ in f) + 1
