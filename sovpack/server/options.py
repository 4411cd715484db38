"""The settings of one `sovpack serve` run, and the checks that make a bad command a usage error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovpack.errors import UsageError

DEFAULT_CTX = 4096


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """As given on the command line; the defaults live there (cli/serve_commands.py), only there."""

    target: str  # NAME, NAME@VERSION or a bundle directory
    variant: str | None
    store: Path | None
    trust: tuple[Path, ...]
    threshold: int | None
    host: str
    port: int
    api_key_file: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    n_gpu_layers: int | None  # parse_gpu_layers: None for auto, -1 for all
    ctx_size: int | None  # None: min(DEFAULT_CTX, the model's trained context)
    parallel: int
    threads: int | None  # per slot; None: default_threads(parallel)
    cors_origins: tuple[str, ...]
    max_tokens: int | None  # upper limit on a request's max_tokens; None: the context size
    max_request_bytes: int
    max_queue: int
    shutdown_timeout: float
    access_log: Path | None  # None: STORE/logs/access.jsonl
    log_prompts: bool
    full_verify: bool
    # slow clients (connections.py): seconds for a request head, for its body, idle between requests;
    # connections that have not sent an authenticated request head
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    max_pending_connections: int
    aliases: tuple[str, ...] = ()  # other model names clients may send (--alias)
    max_n: int = 4  # the largest n (choices per request) accepted
    logprobs: bool = False  # keep every position's logits so that requests may ask for logprobs


def default_threads(parallel: int, cores: int) -> int:
    """CPU threads per slot: the cores but one, shared among the slots (at least 1).

    One core is left for the HTTP event loop, tokenization and sampling: llama.cpp's
    threads wait for each other at every step, so one of them losing its core to the
    server's own work stalls them all (measured in bench/bench_serve.py).
    """
    return max(1, (cores - 1) // parallel)


def check_options(o: ServeOptions) -> None:
    """Everything that can be judged without reading the bundle."""
    if not 0 <= o.port <= 65535:
        raise UsageError(f"--port {o.port}: give a TCP port from 0 to 65535")
    _at_least("--parallel", o.parallel, 1)
    _at_least("--max-queue", o.max_queue, 0)
    _at_least("--max-request-size", o.max_request_bytes, 1024)
    if o.threads is not None:
        _at_least("--threads", o.threads, 1)
    if o.ctx_size is not None:
        _at_least("--ctx-size", o.ctx_size, 64)
    if o.max_tokens is not None:
        _at_least("--max-tokens", o.max_tokens, 1)
    if o.threshold is not None:
        _at_least("--threshold", o.threshold, 1)
    for flag, seconds in (
        ("--header-timeout", o.header_timeout),
        ("--body-timeout", o.body_timeout),
        ("--idle-timeout", o.idle_timeout),
    ):
        if not seconds > 0:
            raise UsageError(f"{flag} {seconds}: give a number of seconds greater than 0")
    _at_least("--max-pending-connections", o.max_pending_connections, 1)
    _at_least("--max-n", o.max_n, 1)
    for alias in o.aliases:
        if not alias or len(alias) > 128 or any(c.isspace() for c in alias):
            raise UsageError(f"--alias {alias!r}: give a model name of 1 to 128 characters without spaces, like gpt-4o")
    if o.shutdown_timeout < 0:
        raise UsageError(f"--shutdown-timeout {o.shutdown_timeout}: give a number of seconds, 0 or more")


def parse_gpu_layers(text: str) -> int | None:
    """None for `auto`, else the number of layers (-1: all)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--n-gpu-layers {text!r}: give auto, a number of layers, or -1 for all") from None
    if value < -1:
        raise UsageError(f"--n-gpu-layers {value}: give auto, a number of layers, or -1 for all")
    return value


def _at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(f"{flag} {value}: must be {minimum} or more")
