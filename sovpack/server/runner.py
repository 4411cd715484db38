"""`sovpack serve` from start to stop: check, bind, verify, audit, serve, shut down.

1. options, API keys, TLS files, the store (it must exist), bind policy (usage errors, exit 2);
2. resolve the target and its trust (not installed: 2; trust revoked: refused, 1);
3. import the serve extra (missing: exit 3), only now, so that usage errors answer fast;
   bind the socket and open the access log, so that a port in use or an unwritable log
   fails before a long verification (exit 3);
4. verify (refused: exit 1, with the verify message, and a serve-refused audit record;
   SIGTERM or Ctrl-C meanwhile: exit 130, audited the same way);
5. write serve-start to the store's audit log (if that fails, nothing is served: exit 3);
6. run uvicorn on the bound socket; the model loads in the background (/health 503 until
   ready), then its files are fingerprinted again;
7. SIGTERM/SIGINT: stop accepting, let accepted requests finish (at most
   --shutdown-timeout seconds, then cancel them), write serve-stop, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sovpack.errors import Failure, Interrupted, Refused, SovpackError, UsageError
from sovpack.server.options import DEFAULT_CTX, ServeOptions, check_options, default_threads
from sovpack.server.security import ApiKeys, check_bind, check_cors_origins, check_tls, is_loopback
from sovpack.store.store import Store

ACCESS_LOG = Path("logs") / "access.jsonl"


UVICORN_TESTED = "0.29 to 0.54"  # graceful_server overrides internals of these versions
UVICORN_INTERNALS = ("capture_signals", "_wait_tasks_to_complete")


def require_serve_extra() -> None:
    missing = []
    for module in ("llama_cpp", "fastapi", "uvicorn", "jsonschema"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise Failure(f"sovpack serve needs {', '.join(missing)}: install the serve extra, `pip install 'sovpack[serve]'`")
    import uvicorn

    lacking = [name for name in UVICORN_INTERNALS if not hasattr(uvicorn.Server, name)]
    if lacking:
        raise Failure(
            f"sovpack serve's graceful shutdown was written for uvicorn {UVICORN_TESTED}; uvicorn {uvicorn.__version__} "
            f"lacks uvicorn.Server.{', '.join(lacking)}: install one in that range, `pip install 'uvicorn>=0.29,<0.55'`"
        )


def serve(options: ServeOptions, say: Callable[[str], None]) -> int:
    check_options(options)
    check_cors_origins(options.cors_origins)
    check_tls(options.tls_cert, options.tls_key)
    keys = ApiKeys.load(options.api_key_file) if options.api_key_file else None
    if warning := keys and keys.permission_warning():
        say(f"warning: {warning}")
    store = Store.existing(options.store)  # serve audits in it; a usage refusal creates no store
    family, address = resolve_bind(options.host, options.port)
    audit = Auditor(store, options)
    try:
        check_bind(address[0], keys is not None)
        target = _resolve_target(options, store)
    except (UsageError, Refused) as e:
        audit.refused(e)
        raise
    require_serve_extra()
    with contextlib.closing(bind_socket(family, address, options)) as sock:
        access_log = _open_access_log(options.access_log or store.root / ACCESS_LOG)  # before a long verification
        try:
            model = _verify(options, store, target, audit, say)
        except BaseException:
            access_log.close()
            raise
        return _run(options, keys, model, sock, access_log, audit, say)


def _open_access_log(path: Path):
    from sovpack.server.access_log import AccessLog

    try:
        return AccessLog(path)
    except OSError as e:
        raise Failure(f"cannot open the access log {path}: {e.strerror} (choose another with --access-log)") from None


def _resolve_target(options: ServeOptions, store: Store):
    from sovpack.server.target import resolve_target

    return resolve_target(options.target, store, options.trust, options.threshold)


def _verify(options: ServeOptions, store: Store, target, audit: Auditor, say: Callable[[str], None]):
    from sovpack.server.fingerprint import VerificationRecords
    from sovpack.server.verification import verify_for_serving

    try:
        with _sigterm_interrupts():
            say(f"verifying {target.bundle} before loading it")
            records = VerificationRecords(store.root)
            return verify_for_serving(target, options.variant, records=records, full_verify=options.full_verify, say=say)
    except (Refused, Interrupted) as e:
        audit.refused(e, bundle=str(target.bundle.resolve()))
        raise


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM while verifying (minutes, for a large model) stops serve as Ctrl-C does: audited, exit 130."""

    def interrupt(signum, frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name} while verifying, before serving anything")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(options, keys, model, sock, access_log, audit, say) -> int:
    import uvicorn

    from sovpack.server.app import create_app
    from sovpack.server.connections import ConnectionLimits, guarded_protocol
    from sovpack.server.engine import Engine, gpu_layers
    from sovpack.server.requests import Limits
    from sovpack.server.state import ServerState

    layers, backend = gpu_layers(options.n_gpu_layers)
    settings = _engine_settings(options, model, layers)
    host, port = sock.getsockname()[:2]
    scheme = "https" if options.tls_cert else "http"
    access_path = access_log.path
    state = ServerState(
        model=model,
        engine=Engine(model, settings),
        limits=Limits(
            model.model_id,
            frozenset({f"{model.model_id}@{model.metadata.version}", *options.aliases}) - {model.model_id},
            options.max_tokens or settings.ctx_size,
            max_n=options.max_n,
            logprobs=options.logprobs,
            aliases=options.aliases,
        ),
        keys=keys,
        access_log=access_log,
        log_prompts=options.log_prompts,
        max_request_bytes=options.max_request_bytes,
        cors_origins=options.cors_origins,
        say=say,
        audit=audit.event,
    )
    url = f"{scheme}://{_show_host(host)}:{port}"
    audit.start(model, settings, backend, url, is_loopback(host), keys, access_path)
    for line in _start_lines(model, settings, backend, keys, access_path, options):
        say(line)
    say(f"listening on {url} (loading the model; /health answers 503 until ready)")
    config = uvicorn.Config(
        create_app(state),
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=options.shutdown_timeout,  # seconds, fractions too; 0: cancel at once
        http=guarded_protocol(
            ConnectionLimits(options.header_timeout, options.body_timeout, options.max_pending_connections, keys)
        ),
        timeout_keep_alive=options.idle_timeout,
        server_header=False,
        proxy_headers=False,
        # pending connections are bounded by the protocol (the oldest closed); this bounds the rest
        limit_concurrency=options.max_pending_connections + max(64, 4 * (options.parallel + options.max_queue)),
    )
    server = graceful_server(config, state)
    started = time.monotonic()
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        audit.stop(state, server.stop_signal, time.monotonic() - started)
    if state.failure:
        raise state.failure
    say(f"stopped ({server.stop_signal or 'shutdown'}): {state.metrics.total_requests} request(s) served")
    return 0


def _engine_settings(options: ServeOptions, model, layers: int):
    from sovpack.common.hashing import cpu_count
    from sovpack.server.engine import EngineSettings

    trained = (model.choice.entry.details or {}).get("context_length")
    ctx = options.ctx_size or min(DEFAULT_CTX, trained if isinstance(trained, int) and trained > 0 else DEFAULT_CTX)
    threads = options.threads or default_threads(options.parallel, cpu_count())
    return EngineSettings(
        ctx_size=ctx,
        parallel=options.parallel,
        threads=threads,
        n_gpu_layers=layers,
        max_queue=options.max_queue,
        logprobs=options.logprobs,
    )


def _start_lines(model, settings, backend: str, keys, access_path: Path, options: ServeOptions) -> list[str]:
    m, entry = model.metadata, model.choice.entry
    digests = (
        "every byte hashed" if model.digests == "full" else "unchanged since a recorded full check (--full-verify to re-hash)"
    )
    template = (
        f"chat template sha256 {model.chat_template_sha256}" if model.chat_template else "no chat template (completions only)"
    )
    auth = f"{len(keys.ids)} API key(s) from {keys.source}" if keys else "no API key (loopback only)"
    return [
        f"verified {m.name} v{m.version}: signed by {', '.join(model.signers)}; {entry.path} ({model.choice.quantization}, "
        f"sha256 {entry.sha256}); {digests}; {template}",
        backend,
        f"slots: {settings.parallel} x context {settings.ctx_size} tokens, {settings.threads} thread(s) each; "
        f"queue up to {settings.max_queue} waiting request(s)",
        f"auth: {auth}; TLS: {'on' if options.tls_cert else 'off'}; CORS origins: {', '.join(options.cors_origins) or 'none'}",
        f"access log: {access_path}" + (" (with prompts)" if options.log_prompts else " (prompts not logged)"),
    ]


def graceful_server(config, state):
    """A uvicorn.Server whose signal handling marks the server as stopping and does not re-raise the signal.

    It overrides uvicorn internals (capture_signals and _captured_signals, from 0.29 on;
    _wait_tasks_to_complete): require_serve_extra refuses a uvicorn without them.
    """
    import uvicorn

    class GracefulServer(uvicorn.Server):
        stop_signal: str | None = None

        def handle_exit(self, sig, frame):
            self.stop_signal = self.stop_signal or signal.Signals(sig).name
            state.begin_stopping()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # exit with our status, not by re-raising the signal

        async def _wait_tasks_to_complete(self):
            """Wait for responses in progress, not for idle keep-alive connections.

            uvicorn waits until every connection has closed; closing an idle TLS connection
            waits (asyncio: up to 30 s) for the client's close_notify, which an idle client
            never sends. So once no response is in progress, idle connections are cut.
            """
            connections = self.server_state.connections
            if all(hasattr(c, "cycle") and hasattr(c, "transport") for c in connections):
                while not self.force_exit and any(c.cycle is not None and not c.cycle.response_complete for c in connections):
                    await asyncio.sleep(0.1)
                for c in list(connections):
                    c.transport.abort()
            await super()._wait_tasks_to_complete()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    server = GracefulServer(config)
    state.request_exit = lambda: setattr(server, "should_exit", True)
    return server


def resolve_bind(host: str, port: int) -> tuple[int, tuple]:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


def bind_socket(family: int, address: tuple, options: ServeOptions) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as e:
        sock.close()
        hint = "; another process is listening there: stop it or choose another --port" if e.errno == errno.EADDRINUSE else ""
        raise Failure(f"cannot listen on {options.host} port {options.port}: {e.strerror}{hint}") from None
    return sock


def _show_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Auditor:
    """serve-start, serve-stop and serve-refused records in the store's audit log."""

    def __init__(self, store: Store, options: ServeOptions):
        self.store, self.options = store, options

    def _append(self, event: str, **fields) -> None:
        try:
            self.store.audit.append(event, target=self.options.target, pid=os.getpid(), **fields)
        except OSError as e:
            raise Failure(
                f"cannot write the audit log {self.store.audit.path}: {e.strerror}; refusing to serve unaudited"
            ) from None

    def event(self, event: str, **fields) -> None:
        """Any other serve record (an engine crash, its restart); Failure if it cannot be written."""
        self._append(event, **fields)

    def refused(self, error: SovpackError, **fields) -> None:
        step = getattr(error, "step", None)
        with contextlib.suppress(Failure):
            self._append("serve-refused", reason=str(error), exit_code=error.exit_code, step=step, **fields)

    def start(self, model, settings, backend: str, url: str, loopback_only: bool, keys, access_path: Path) -> None:
        m, entry = model.metadata, model.choice.entry
        self._append(
            "serve-start",
            bundle=str(model.target.bundle.resolve()),
            name=m.name,
            version=m.version,
            file=entry.path,
            sha256=entry.sha256,
            chat_template_sha256=model.chat_template_sha256,
            signers=model.signers,
            threshold=model.target.policy.threshold,
            trust=model.target.trust_source,
            digests=model.digests,
            url=url,
            loopback_only=loopback_only,
            api_keys=list(keys.ids) if keys else [],
            tls=bool(self.options.tls_cert),
            parallel=settings.parallel,
            ctx_size=settings.ctx_size,
            n_gpu_layers=settings.n_gpu_layers,
            backend=backend,
            access_log=str(access_path.resolve()),
            log_prompts=self.options.log_prompts,
        )

    def stop(self, state, stop_signal: str | None, uptime: float) -> None:
        reason = f"signal {stop_signal}" if stop_signal else ("failure" if state.failure else "shutdown")
        if isinstance(state.failure, Refused):
            self.refused(state.failure, bundle=str(state.model.target.bundle.resolve()))
        with contextlib.suppress(Failure):
            self._append(
                "serve-stop",
                reason=reason,
                error=str(state.failure) if state.failure else None,
                uptime_seconds=round(uptime, 1),
                requests=state.metrics.total_requests,
                prompt_tokens=state.metrics.prompt_tokens,
                completion_tokens=state.metrics.completion_tokens,
            )
