"""serve."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sovpack.cli import app
from sovpack.cli.options import STORE_HELP, TRUST_HELP


@app.command()
def serve(
    target: str = typer.Argument(..., metavar="NAME_OR_BUNDLE", help="Installed bundle NAME[@VERSION], or a bundle directory."),
    variant: Optional[str] = typer.Option(
        None,
        "--variant",
        metavar="TYPE_OR_FILE",
        help="GGUF to serve: quantization type (Q4_K_M), or its path or file name in the bundle.",
    ),
    store: Optional[Path] = typer.Option(None, "--store", metavar="DIR", help=STORE_HELP),
    trust: List[Path] = typer.Option([], "--trust", metavar="DIR_OR_PUBFILE", help=TRUST_HELP),
    threshold: Optional[int] = typer.Option(
        None,
        "--threshold",
        metavar="K",
        help=(
            "Distinct trusted signers required. With --trust: default 1. Without: replaces the store's threshold "
            "for a bundle directory; for an installed NAME it can only raise the threshold the bundle was imported "
            "under (a lower value is refused, exit 2)."
        ),
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="ADDRESS", help="Address to listen on; anything but loopback needs --api-key-file."
    ),
    port: int = typer.Option(8080, "--port", metavar="N", help="TCP port (0: any free port)."),
    api_key_file: Optional[Path] = typer.Option(
        None,
        "--api-key-file",
        metavar="FILE",
        help="API keys, one per line (# comments); clients send `Authorization: Bearer KEY`.",
    ),
    tls_cert: Optional[Path] = typer.Option(
        None, "--tls-cert", metavar="FILE", help="TLS certificate chain (PEM); with --tls-key."
    ),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", metavar="FILE", help="TLS private key (PEM)."),
    n_gpu_layers: str = typer.Option(
        "auto", "--n-gpu-layers", metavar="auto|N", help="auto (all layers when llama.cpp has GPU offload), N, or -1 for all."
    ),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", metavar="N", help="Context tokens per slot (default min(4096, the model's))."
    ),
    parallel: int = typer.Option(1, "--parallel", metavar="N", help="Generation slots: requests answered at the same time."),
    threads: Optional[int] = typer.Option(
        None, "--threads", metavar="N", help="CPU threads per slot (default: (cores - 1) / --parallel, at least 1)."
    ),
    cors_origin: List[str] = typer.Option(
        [],
        "--cors-origin",
        metavar="ORIGIN",
        help="Allowed browser origin, e.g. https://chat.example.mil; repeat. None by default.",
    ),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", metavar="N", help="Largest max_tokens a request may ask for (default: the context size)."
    ),
    max_request_size: str = typer.Option(
        "1M", "--max-request-size", metavar="SIZE", help="Largest request body (413 beyond it): bytes, or 1M, 256K, 2MiB."
    ),
    max_queue: int = typer.Option(
        16, "--max-queue", metavar="N", help="Requests that may wait for a slot; more get 503 with Retry-After."
    ),
    shutdown_timeout: float = typer.Option(
        30.0, "--shutdown-timeout", metavar="SECONDS", help="Seconds in-flight requests get to finish on SIGTERM/SIGINT."
    ),
    access_log: Optional[Path] = typer.Option(
        None, "--access-log", metavar="FILE", help="JSON-lines access log (default STORE/logs/access.jsonl)."
    ),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="Also write prompts and messages to the access log."),
    full_verify: bool = typer.Option(
        False, "--full-verify", help="Re-hash the GGUF even when a recorded full check vouches for it."
    ),
    header_timeout: float = typer.Option(
        10.0,
        "--header-timeout",
        metavar="SECONDS",
        help="Seconds a client has to send a request's head; then the connection is closed.",
    ),
    body_timeout: float = typer.Option(
        30.0,
        "--body-timeout",
        metavar="SECONDS",
        help="Seconds a client has to send a request's body after its head; then it is closed.",
    ),
    idle_timeout: float = typer.Option(
        5.0, "--idle-timeout", metavar="SECONDS", help="Seconds a keep-alive connection may stay idle."
    ),
    max_pending_connections: int = typer.Option(
        128,
        "--max-pending-connections",
        metavar="N",
        help="Connections that have not yet sent a request with a valid API key; beyond it the oldest is closed.",
    ),
    alias: List[str] = typer.Option(
        [],
        "--alias",
        metavar="NAME",
        help="Another model name that requests may use (clients that hard-code one, e.g. gpt-4o); repeat.",
    ),
    max_n: int = typer.Option(
        4, "--max-n", metavar="N", help="Largest n (choices per request); they are generated one after the other."
    ),
    logprobs: bool = typer.Option(
        False,
        "--logprobs",
        help="Allow logprobs/top_logprobs: each slot keeps the logits of every context position (ctx-size x vocabulary "
        "floats, e.g. 4096 x 128k x 4 B = 2 GiB per slot) and prompts evaluate more slowly.",
    ),
) -> None:
    """Verify a bundle, then serve its GGUF over an OpenAI-compatible HTTP API (llama.cpp).

    llama.cpp runs in worker processes: one that crashes fails only its request (500 engine_failed)
    and is replaced after the model is verified again.

    Exit codes: 1 the bundle failed verification, changed while served, or failed the re-verification
    after an engine crash; 2 usage (including a
    non-loopback --host without --api-key-file, a missing TLS file, a store that does not exist:
    serve audits in it); 3 other failures (port in
    use, missing `serve` extra, audit or access log not writable, llama.cpp cannot load the verified file); 130
    SIGTERM or Ctrl-C during verification, before serving.
    """
    from sovpack.common.sizes import parse_size
    from sovpack.server.options import ServeOptions, parse_gpu_layers
    from sovpack.server.runner import serve as run_server

    options = ServeOptions(
        target=target,
        variant=variant,
        store=store,
        trust=tuple(trust),
        threshold=threshold,
        host=host,
        port=port,
        api_key_file=api_key_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        n_gpu_layers=parse_gpu_layers(n_gpu_layers),
        ctx_size=ctx_size,
        parallel=parallel,
        threads=threads,
        cors_origins=tuple(cors_origin),
        max_tokens=max_tokens,
        max_request_bytes=parse_size(max_request_size, "--max-request-size"),
        max_queue=max_queue,
        shutdown_timeout=shutdown_timeout,
        access_log=access_log,
        log_prompts=log_prompts,
        full_verify=full_verify,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
        max_pending_connections=max_pending_connections,
        aliases=tuple(alias),
        max_n=max_n,
        logprobs=logprobs,
    )
    raise typer.Exit(run_server(options, _say))


def _say(line: str) -> None:
    typer.echo(f"sovpack serve: {line}", err=True)
