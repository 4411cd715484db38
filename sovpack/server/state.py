"""What the running server knows: the verified model, the engine, its status, its logs.

Status: "loading" (health 503) -> "ready" (200) -> "stopping" (503; requests already
accepted still finish). "restarting" (503) while an engine worker that died is replaced:
the model is verified again (every byte), a new worker loads it, and the status returns
to "ready"; requests already waiting for a slot wait for it. "failed" when loading fails,
a served file changes, the bundle expires while serving, or the re-verification after a
crash fails: requests are refused and the server shuts down with that error as its exit
status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sovpack.bundle.verify import check_expiry
from sovpack.errors import Failure, Refused, SovpackError
from sovpack.server.access_log import AccessLog
from sovpack.server.engine import Engine
from sovpack.server.errors import ApiError, not_serving
from sovpack.server.metrics import Gauges, Metrics
from sovpack.server.requests import Limits
from sovpack.server.security import ApiKeys
from sovpack.server.verification import VerifiedModel


@dataclass
class ServerState:
    model: VerifiedModel
    engine: Engine
    limits: Limits
    keys: ApiKeys | None
    access_log: AccessLog
    log_prompts: bool
    max_request_bytes: int
    cors_origins: tuple[str, ...]
    say: Callable[[str], None]
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"
    failure: SovpackError | None = None
    request_exit: Callable[[], None] = lambda: None  # set by the runner: begin a graceful shutdown
    audit: Callable[..., None] = lambda event, **fields: None  # set by the runner: the store's audit log
    _recheck: asyncio.Task | None = None
    _restart: asyncio.Task | None = None

    async def load(self) -> None:
        self.engine.on_failure = self.engine_failed
        try:
            await asyncio.to_thread(self.engine.load, asyncio.get_running_loop())
        except SovpackError as e:
            self.fail(e)
            return
        except Exception as e:  # llama.cpp failures we did not foresee: still a clean exit 3
            self.fail(Failure(f"loading {self.model.choice.entry.path} failed: {type(e).__name__}: {e}"))
            return
        if self.status == "loading":
            self.status = "ready"
            self.say(f"ready: serving {self.model.model_id} v{self.model.metadata.version} with {len(self.engine.slots)} slot(s)")

    def fail(self, error: SovpackError) -> None:
        if self.failure is None:
            self.failure = error
            self.status = "failed"
            self.say(f"error: {error}")
            self.engine.cancel_all(f"the server stopped serving this model: {error}")
            self.request_exit()

    def engine_failed(self, worker, status: str, during_request: bool) -> None:
        """A worker process died: audit it, and replace it once the model is verified again (event loop)."""
        if self.status not in ("ready", "restarting"):
            return
        self.say(f"error: the engine's worker process {worker.pid} (slot {worker.index}) {status}; verifying the model again")
        try:
            self.audit(
                "serve-engine-failed", worker_pid=worker.pid, slot=worker.index, status=status, during_request=during_request
            )
        except SovpackError as e:  # the audit log cannot be written: serving stops
            self.fail(e)
            return
        self.status = "restarting"
        self.metrics.engine_failures += 1
        if self._restart is None:
            self._restart = asyncio.create_task(self._restart_engine())

    async def _restart_engine(self) -> None:
        try:
            started = time.monotonic()
            while dead := self.engine.dead_workers():
                await asyncio.to_thread(self.model.reverify)
                for worker in dead:
                    await asyncio.to_thread(self.engine.respawn, worker)
            if self.status != "restarting":
                return
            seconds = round(time.monotonic() - started, 1)
            self.audit("serve-engine-restarted", workers=[w.pid for w in self.engine.slots], seconds=seconds)
            self.status = "ready"
            self.say(f"ready again: the model verified again and {len(self.engine.slots)} worker(s) running")
        except SovpackError as e:
            self.fail(e)
        except Exception as e:  # llama.cpp failures we did not foresee: still a clean exit 3
            self.fail(Failure(f"restarting the engine failed: {type(e).__name__}: {e}"))
        finally:
            self._restart = None

    def begin_stopping(self) -> None:
        if self.status in ("loading", "ready", "restarting"):
            self.status = "stopping"

    def ensure_serving(self) -> None:
        """Before each request: the server is ready, the files unchanged, the bundle not expired."""
        if self.status == "restarting":
            raise ApiError(
                503,
                "the generation engine is restarting after a failure (the model is being verified again); retry shortly",
                type="server_error",
                code="engine_restarting",
                headers={"Retry-After": "2"},
            )
        if self.status != "ready":
            raise not_serving(self.status)
        try:
            moved = self.model.check_unchanged()
            self.engine.check_loaded()
            self._check_expiry()
        except Refused as e:
            self.fail(e)
            raise ApiError(
                503, f"the server stopped serving this model: {e}", type="server_error", code="integrity_check_failed"
            ) from None
        if moved and self._recheck is None:
            self._recheck = asyncio.create_task(self._recheck_files(moved))

    async def _recheck_files(self, paths) -> None:
        """Only a file's ctime moved (a hard link, a chmod...): re-hash it while serving continues."""
        names = ", ".join(p.name for p in paths)
        self.say(f"{names}: inode metadata changed (ctime) since verification; re-hashing it against the signed digests")
        try:
            await asyncio.to_thread(self.model.recheck, paths)
            self.say(f"{names}: still matches the signed digests")
        except Refused as e:
            self.fail(e)
        finally:
            self._recheck = None

    def _check_expiry(self) -> None:
        check_expiry(self.model.metadata, datetime.now(timezone.utc))  # a StepFailed("expiry"): a Refused

    def gauges(self) -> Gauges:
        pool = self.engine.pool
        return Gauges(
            queue_depth=pool.waiting if pool else 0,
            slots_busy=pool.busy if pool else 0,
            slots_total=len(self.engine.slots),
            ready=self.status == "ready",
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        loading = asyncio.create_task(self.load())
        yield
        self.begin_stopping()
        await loading
        if self._restart is not None:
            self._restart.cancel()
        await asyncio.to_thread(self.engine.close)
        self.model.close()
        self.access_log.close()
