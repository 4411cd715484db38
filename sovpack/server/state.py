"""What the running server knows: the verified model, the engine, its status, its logs.

Status: "loading" (health 503) -> "ready" (200) -> "stopping" (503; requests already
accepted still finish). "failed" when loading fails or a served file changes or the
bundle expires while serving: requests are refused and the server shuts down with the
refusal as its exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    _recheck: asyncio.Task | None = None

    async def load(self) -> None:
        try:
            await asyncio.to_thread(self.engine.load)
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

    def begin_stopping(self) -> None:
        if self.status in ("loading", "ready"):
            self.status = "stopping"

    def ensure_serving(self) -> None:
        """Before each request: the server is ready, the files unchanged, the bundle not expired."""
        if self.status != "ready":
            raise not_serving(self.status)
        try:
            moved = self.model.check_unchanged()
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
        await asyncio.to_thread(self.engine.close)
        self.access_log.close()
