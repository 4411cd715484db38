"""A copy of every audit record in the system log (RFC 5424), so that one exists outside the store.

The target is a store setting (`sovpack audit syslog TARGET`, state/syslog.json): a Unix datagram
socket such as /dev/log, or udp://HOST:PORT (RFC 5426). Each record is one message, facility
authpriv, severity notice (warning for a refused or failed outcome), MSGID the event, and the
record's JSON line — exactly the bytes in audit.log — as the message. Sending is best effort: the
store's own log is the record; a copy that cannot be sent does not stop the change.
"""

from __future__ import annotations

import os
import re
import socket
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from sovpack.common import safe_json
from sovpack.errors import UsageError

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING, SEVERITY_NOTICE = 4, 5
_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def check_target(target: str) -> str:
    """A Unix socket path or udp://HOST:PORT; anything else is a usage error naming it."""
    if target.startswith("udp://"):
        parts = urlsplit(target)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or not port:
            raise UsageError(f"syslog target {target!r}: give udp://HOST:PORT")
        return target
    if not target.startswith("/"):
        raise UsageError(f"syslog target {target!r}: give the absolute path of a Unix socket (/dev/log) or udp://HOST:PORT")
    return target


def message(event: str, line: bytes, outcome: str | None, *, now: datetime | None = None) -> bytes:
    """The RFC 5424 message for one audit record (`line`, as written to audit.log)."""
    severity = SEVERITY_WARNING if outcome in ("refused", "failed") else SEVERITY_NOTICE
    stamp = (now or datetime.now(timezone.utc)).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = _PRINTABLE.sub("", socket.gethostname())[:255] or "-"
    msgid = _PRINTABLE.sub("", event)[:32] or "-"
    header = f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {stamp} {host} sovpack {os.getpid()} {msgid} - "
    return header.encode() + b"\xef\xbb\xbf" + line


def send(target: str, data: bytes) -> None:
    """One datagram to `target`; OSError when it cannot be sent."""
    if target.startswith("udp://"):
        parts = urlsplit(target)
        family = socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(data, (parts.hostname, parts.port))
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(data, target)


def read_target(setting: Path) -> str | None:
    """The configured target, or None; a damaged setting is ignored here (appends stay best effort) and
    named by `audit verify` (Store.syslog_target)."""
    try:
        target = safe_json.loads(setting.read_bytes(), max_bytes=1 << 16, max_depth=4).get("target")
    except (OSError, ValueError, AttributeError):
        return None
    return target if isinstance(target, str) else None
