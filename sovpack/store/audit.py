"""The store's append-only audit log: JSON lines, each carrying the SHA-256 of the line before.

Editing, inserting or deleting a line breaks the chain and `verify_chain` names the first
line at fault. Lines removed from the end leave an intact chain: the head witness (a small
file beside the log, rewritten after each append) records how many lines the log had and
the digest of the last, so `verify_chain` refuses a log shorter than that, or whose line at
that place differs. Someone who can rewrite the witness too can still cut the log unseen:
the head digest that `verify_chain` returns is what an operator records elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sovpack.bundle.metadata import format_time
from sovpack.common import safe_json
from sovpack.common.files import lock_open_file, write_atomically
from sovpack.common.hashing import sha256_bytes
from sovpack.errors import Failure, Refused
from sovpack.store import syslog

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
    def __init__(self, path: Path, witness: Path | None = None, syslog_setting: Path | None = None):
        self.path, self.witness, self.syslog_setting = path, witness, syslog_setting

    def append(self, event: str, **fields) -> dict:
        """Append one record atomically with respect to other sovpack processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "r+b") as f:
            lock_open_file(f.fileno())
            _end_cut_line(f)
            last = _last_line(f)
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
                self._advance_witness(f, record["seq"], line, f.tell())
        self._copy_to_syslog(event, line, fields.get("outcome"))
        return record

    def _copy_to_syslog(self, event: str, line: bytes, outcome) -> None:
        target = syslog.read_target(self.syslog_setting) if self.syslog_setting else None
        if target is None:
            return
        with contextlib.suppress(OSError):  # best effort: `audit verify` says whether the target answers
            syslog.send(target, syslog.message(event, line, outcome if isinstance(outcome, str) else None))

    @contextmanager
    def ahead_of(self, event: str, **fields) -> Iterator[None]:
        """Write-ahead: record `event`, then run the change it records; a change whose record cannot be written does not happen.

        When the change then fails, a second record with `outcome: "failed"` and the reason says so
        (unless the disk that refused the change refuses that record too).
        """
        try:
            self.append(event, **fields)
        except OSError as e:
            raise Failure(
                f"cannot write the audit log {self.path}: {e.strerror or e}; {event} was not done "
                "(every change to the store is recorded before it is made)"
            ) from None
        try:
            yield
        except BaseException as e:
            try:
                self.append(event, **{**fields, "outcome": "failed", "reason": str(e) or type(e).__name__})
            except OSError:
                pass
            raise

    def _advance_witness(self, f, seq: int, line: bytes, end: int) -> None:
        """Record the new head, unless the log no longer holds the line the witness names: then it stays, as evidence.

        Records appended after the witnessed line, forged or not, do not stop it: a chain cannot tell
        a forged record from a genuine one, but a log cut back below the witness is always caught.
        """
        witness = self._read_witness()
        if witness is None and self.witness.exists():
            return  # damaged: `verify_chain` says so
        if witness is not None and not _holds(f, *witness):
            return
        try:
            self.witness.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.witness, json.dumps({"records": seq, "head": sha256_bytes(line), "offset": end}).encode())
        except OSError:
            pass  # the record is written; a witness left behind still catches a cut below it, and the next append catches up

    def _read_witness(self) -> tuple[int, str, int | None] | None:
        """(records, digest of the last, byte offset of its end); the offset is absent from witnesses of sovpack 0.1."""
        try:
            witness = parse_line(self.witness.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(witness, dict):
            return None
        records, head, offset = witness.get("records"), witness.get("head"), witness.get("offset")
        if not _is_whole(records) or not isinstance(head, str) or not (offset is None or _is_whole(offset)):
            return None  # damaged: what sovpack writes is a count, a digest and a byte offset
        return records, head, offset

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
        count, head, _offset = witness
        if count > len(lines):
            raise Refused(
                f"{self.path} holds {len(lines)} records but had {count} ({self.witness}): lines were deleted "
                f"from its end, or an older copy of the log was put back"
            )
        if count and sha256_bytes(lines[count - 1]) != head:
            raise Refused(
                f"{self.path}: line {count} is not the one {self.witness} recorded: the log was replaced from that line on"
            )


def _holds(f, count: int, head: str, offset: int | None) -> bool:
    """Whether the open log still holds, as its line `count` ending at byte `offset`, the line whose digest is `head`."""
    if offset is None:  # a witness without offset: find the line by counting
        f.seek(0)
        lines = f.read().split(b"\n")
        return count == 0 or (count < len(lines) and sha256_bytes(lines[count - 1]) == head)
    if count == 0:
        return True
    start = max(0, offset - (1 << 20))
    f.seek(start)
    before = f.read(offset - start)
    if not before.endswith(b"\n"):
        return False
    if start and b"\n" not in before[:-1]:  # a line longer than the window: count instead
        return _holds(f, count, head, None)
    return sha256_bytes(before[:-1].rsplit(b"\n", 1)[-1]) == head


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _last_line(f) -> bytes | None:
    """The log's last line without its newline, or None when the log is empty."""
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
        return int(parse_line(last)["seq"]) + 1
    except (ValueError, KeyError, TypeError, OverflowError):  # the last line was tampered with: count lines instead
        f.seek(0)
        return sum(1 for _ in f) + 1
