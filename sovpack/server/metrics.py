"""Prometheus text exposition (format 0.0.4) of what the server did, without extra dependencies.

Series (all prefixed sovpack_):
  requests_total{path,status}          counter, every request but /health
  prompt_tokens_total, completion_tokens_total   counters
  queue_rejections_total               counter, 503s because the queue was full
  client_disconnects_total             counter
  engine_failures_total                counter, engine worker processes that died while serving
  request_duration_seconds{path}       histogram, request start to last byte
  time_to_first_token_seconds          histogram, generation requests
  queue_wait_seconds                   histogram, time spent waiting for a slot
  queue_depth, slots_busy, slots_total, ready   gauges
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

from sovpack.server.access_log import RequestRecord

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/metrics"}  # /health is not observed
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.total}"]


@dataclass(frozen=True)
class Gauges:
    """The server's state at the moment /metrics is rendered."""

    queue_depth: int
    slots_busy: int
    slots_total: int
    ready: bool


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejections = 0
        self.disconnects = 0
        self.engine_failures = 0
        self.durations: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft = Histogram()
        self.queue_wait = Histogram()

    def observe(self, record: RequestRecord) -> None:
        route = route_label(record.path)
        with self._lock:
            self.requests[(route, record.status or 0)] += 1
            self.prompt_tokens += record.prompt_tokens or 0
            self.completion_tokens += record.completion_tokens or 0
            self.rejections += record.error == "queue_full"
            self.disconnects += record.outcome == "client_disconnected"
            if record.latency_ms is not None:
                self.durations[route].observe(record.latency_ms / 1000)
            if record.ttft_ms is not None:
                self.ttft.observe(record.ttft_ms / 1000)
            if record.queue_ms is not None:
                self.queue_wait.observe(record.queue_ms / 1000)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def render(self, gauges: Gauges) -> str:
        with self._lock:
            lines = [
                "# TYPE sovpack_requests_total counter",
                *(f'sovpack_requests_total{{path="{_esc(p)}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())),
                "# TYPE sovpack_prompt_tokens_total counter",
                f"sovpack_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE sovpack_completion_tokens_total counter",
                f"sovpack_completion_tokens_total {self.completion_tokens}",
                "# TYPE sovpack_queue_rejections_total counter",
                f"sovpack_queue_rejections_total {self.rejections}",
                "# TYPE sovpack_client_disconnects_total counter",
                f"sovpack_client_disconnects_total {self.disconnects}",
                "# TYPE sovpack_engine_failures_total counter",
                f"sovpack_engine_failures_total {self.engine_failures}",
                "# TYPE sovpack_request_duration_seconds histogram",
                *(
                    line
                    for p, h in sorted(self.durations.items())
                    for line in h.lines("sovpack_request_duration_seconds", f'path="{_esc(p)}"')
                ),
                "# TYPE sovpack_time_to_first_token_seconds histogram",
                *self.ttft.lines("sovpack_time_to_first_token_seconds"),
                "# TYPE sovpack_queue_wait_seconds histogram",
                *self.queue_wait.lines("sovpack_queue_wait_seconds"),
            ]
        lines += [
            "# TYPE sovpack_queue_depth gauge",
            f"sovpack_queue_depth {gauges.queue_depth}",
            "# TYPE sovpack_slots_busy gauge",
            f"sovpack_slots_busy {gauges.slots_busy}",
            "# TYPE sovpack_slots_total gauge",
            f"sovpack_slots_total {gauges.slots_total}",
            "# TYPE sovpack_ready gauge",
            f"sovpack_ready {int(gauges.ready)}",
        ]
        return "\n".join(lines) + "\n"


def route_label(path: str) -> str:
    """Known routes by name, anything else as "other" (label values must stay few)."""
    if path in ROUTES:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
