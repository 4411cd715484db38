"""The per-request access log: one JSON object per line, appended as each request ends.

Default location STORE/logs/access.jsonl (`--access-log FILE` to choose). Fields are
documented in docs/serve.md. The API key itself is never written, only its key id;
prompts and messages are written only with `--log-prompts`. Lines are appended with
single O_APPEND writes, so `logrotate` with `copytruncate` works while serving.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class RequestRecord:
    method: str
    path: str
    client: str | None
    started: float = field(default_factory=time.monotonic, repr=False)
    time: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    key_id: str | None = None
    status: int | None = None
    model: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    outcome: str = "ok"  # ok, error, client_disconnected, cancelled
    error: str | None = None  # the OpenAI error code, when there was one
    queue_ms: float | None = None
    ttft_ms: float | None = None  # time to first token (streams: first chunk)
    latency_ms: float | None = None
    prompt: object = None  # only with --log-prompts

    def since_start_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 1)

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "started"}
        if data["prompt"] is None:
            del data["prompt"]
        return data


class AccessLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._lock = threading.Lock()
        self._warned = False

    def write(self, record: RequestRecord) -> None:
        line = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True).encode() + b"\n"
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as e:
                if not self._warned:
                    print(f"warning: cannot write the access log {self.path}: {e.strerror}", file=sys.stderr, flush=True)
                    self._warned = True

    def close(self) -> None:
        os.close(self._fd)
