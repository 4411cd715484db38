"""The store's append-only audit log: JSON lines, each carrying the SHA-256 of the line before.

Editing, inserting or deleting a line breaks the chain and `verify_chain` names the first
line at fault. Lines removed from the end leave an intact chain: the head witness (a small
file beside the log, rewritten after each append) records how many lines the log had and
the digest of the last, so `verify_chain` refuses a log shorter than that, or whose line at
that place differs. Someone who can rewrite the witness too can still cut the log unseen:
the head digest that `verify_chain` returns is what an operator records elsewhere.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack.bundle.directory import write_atomically
from sovpack.bundle.metadata import format_time
from sovpack.common import safe_json
from sovpack.common.hashing import sha256_bytes
from sovpack.errors import Refused

GENESIS = "0" * 64
MAX_LINE_BYTES = 1 << 20  # a record is a few hundred bytes


def parse_line(line: bytes) -> object:
    """One line of the log as JSON, bounded; a ValueError when it is not JSON sovpack reads."""
    return safe_json.loads(line, max_bytes=MAX_LINE_BYTES, max_depth=16)


@dataclass(frozen=True)
class ChainStatus:
    records: int
    head: str  # SHA-256 of the last line: note it down to detect truncation later


class AuditLog:
    def __init__(self, path: Path, witness: Path | None = None):
        self.path, self.witness = path, witness

    def append(self, event: str, **fields) -> dict:
        """Append one record atomically with respect to other sovpack processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            _end_cut_line(f)
            tail = _tail_lines(f)
            last = tail[-1] if tail else None
            record = {
                "seq": _next_seq(f, last),
                "time": format_time(datetime.now(timezone.utc)),
                "event": event,
                **fields,
                "prev": sha256_bytes(last) if last else GENESIS,
            }
            line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
            f.write(line + b"\n")
            f.flush()
            os.fsync(f.fileno())
            if self.witness is not None:  # still under the lock: witnesses are written in log order
                self._advance_witness(record["seq"], tail, line)
        return record

    def _advance_witness(self, seq: int, tail: list[bytes], line: bytes) -> None:
        """Record the new head, unless the log no longer continues what the witness saw: then the witness stays, as evidence."""
        witness = self._read_witness()
        continued = [(seq - len(tail) + i, sha256_bytes(t)) for i, t in enumerate(tail)]  # the witness may be one behind
        if witness is None and self.witness.exists():
            return  # damaged: `verify_chain` says so
        if witness is not None and witness not in continued:
            return
        self.witness.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.witness, json.dumps({"records": seq, "head": sha256_bytes(line)}).encode())

    def _read_witness(self) -> tuple[int, str] | None:
        try:
            witness = parse_line(self.witness.read_bytes())
            return int(witness["records"]), str(witness["head"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                record = parse_line(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise Refused(f"{self.path}: line {number} is not an audit record (see `sovpack audit verify`)")
            records.append(record)
        return records

    def verify_chain(self) -> ChainStatus:
        """Check every link; raise Refused naming the first broken line."""
        if not self.path.exists():
            self._check_witness([])
            return ChainStatus(0, GENESIS)
        expected_prev = GENESIS
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1] != b"":
            raise Refused(f"{self.path}: the last line is incomplete (a write was cut off or the file was edited)")
        for number, line in enumerate(lines[:-1], start=1):
            try:
                record = parse_line(line)
                seq, prev = record["seq"], record["prev"]
            except (ValueError, KeyError, TypeError):
                raise Refused(f"{self.path}: line {number} is not an audit record") from None
            if prev != expected_prev or seq != number:
                raise Refused(
                    f"{self.path}: the chain breaks at line {number} (seq {seq}): line {number - 1 or 'start'} "
                    "was edited, or lines were inserted or deleted"
                )
            expected_prev = sha256_bytes(line)
        self._check_witness(lines[:-1])
        return ChainStatus(len(lines) - 1, expected_prev)

    def _check_witness(self, lines: list[bytes]) -> None:
        """The log still holds the line the witness names, where it names it (a crash may leave the witness one behind)."""
        if self.witness is None or not self.witness.exists():
            return
        witness = self._read_witness()
        if witness is None:
            raise Refused(
                f"{self.witness}, the audit log's head witness, is damaged: the log cannot be checked for lines cut from its end"
            )
        count, head = witness
        if count > len(lines):
            raise Refused(
                f"{self.path} holds {len(lines)} records but had {count} ({self.witness}): lines were deleted "
                f"from its end, or an older copy of the log was put back"
            )
        if count and sha256_bytes(lines[count - 1]) != head:
            raise Refused(
                f"{self.path}: line {count} is not the one {self.witness} recorded: the log was replaced from that line on"
            )


def _tail_lines(f) -> list[bytes]:
    """The last two lines of the log (fewer if it has fewer), without their newlines."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return []
    block = min(size, 1 << 16)
    while True:
        f.seek(size - block)
        tail = f.read(block).rstrip(b"\n")
        if tail.count(b"\n") >= 2 or block == size:
            return tail.split(b"\n")[-2:]
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
        return int(parse_line(last)["seq"]) + 1
    except (ValueError, KeyError, TypeError, OverflowError):  # the last line was tampered with: count lines instead
        f.seek(0)
        return sum(1 for _ in f) + 1
