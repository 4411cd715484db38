"""The generation engine: N worker processes ("slots"), each one llama.cpp context over the verified GGUF.

Each slot is a process of its own (worker.py) that loads the GGUF through the descriptors
verification hashed (`/proc/self/fd/N`); llama.cpp memory-maps the weights, so N workers
share one copy of them in the page cache. A worker runs one request at a time; the SlotPool
in front decides who runs next. A request's output flows back to the event loop as events
("chunk", "result", "end", "error"), so a slow client never stalls generation and a client
that leaves only sends a cancel message: the worker's stop check ends the generation at the
next token and the slot is handed back.

A worker that dies (segfault, abort, killed for memory) takes only itself down: the request
it was running gets a 500 `engine_failed`, and the server (state.py) audits the crash,
verifies the files again and starts a new worker (`respawn`) while the others keep serving.

After a worker has loaded, and before each request, its memory map must show the verified
inodes (opened.py): the bytes llama.cpp maps are the bytes that were hashed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from sovpack.errors import Failure, Refused
from sovpack.server.errors import ApiError
from sovpack.server.generation import Job
from sovpack.server.opened import check_mapped
from sovpack.server.slots import SlotPool
from sovpack.server.verification import VerifiedModel
from sovpack.server.worker import LoadedInfo, WorkerSettings

EMBEDDING_ARCHITECTURES = {
    "bert",
    "nomic-bert",
    "nomic-bert-moe",
    "jina-bert-v2",
    "jina-bert-v3",
    "t5encoder",
    "modern-bert",
    "neo-bert",
}
STOP_GRACE_SECONDS = 10  # a worker told to stop gets this long before it is killed


@dataclass(frozen=True)
class EngineSettings:
    ctx_size: int
    parallel: int
    threads: int  # per slot
    n_gpu_layers: int
    max_queue: int
    logprobs: bool = False  # logits_all: every position's logits kept, for requests' logprobs (--logprobs)


class Generation:
    """One request on one slot: the worker's events arrive here, the event loop reads them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.on_cancel: Callable[[], None] = lambda: None  # tells the worker
        self.cancelled = False
        self.interrupted: str | None = None  # why the server (not the client) stopped it
        self.started = time.monotonic()

    def emit(self, kind: str, value=None) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

    async def next(self) -> tuple[str, object]:
        return await self._events.get()

    def cancel(self, interrupted: str | None = None) -> None:
        """Stop at the next token; `interrupted` says why when the client is still waiting."""
        self.interrupted = self.interrupted or interrupted
        if not self.cancelled:
            self.cancelled = True
            self.on_cancel()


class Worker:
    """The server's handle on one worker process: start it, send it jobs, read its events, notice its death."""

    def __init__(self, index: int, engine: Engine):
        self.index, self.engine = index, engine
        self.proc: subprocess.Popen | None = None
        self.info: LoadedInfo | None = None
        self.alive = False
        self.busy = False  # taken from the pool (event loop thread only)
        self.generation: Generation | None = None
        self._job_ids = itertools.count(1)
        self._job_id = 0
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, settings: WorkerSettings) -> None:
        """Start the process and wait until it has loaded the model (blocking)."""
        ours, theirs = socket.socketpair()
        fds = (theirs.fileno(), *(fd for _, fd in settings.parts))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sovpack.server.worker", str(theirs.fileno())],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock, self._conn = ours, Connection(os.dup(ours.fileno()))
        try:
            self._conn.send(settings)
            message = self._conn.recv()
        except (EOFError, OSError):
            raise Failure(f"{self._name()} died while loading the model ({self._exit_status()})") from None
        if message[0] != "loaded":
            raise Failure(message[1])
        self.info = message[1]
        self.alive = True
        threading.Thread(target=self._receive, daemon=True, name=f"sovpack-slot{self.index}-events").start()

    def submit(self, job: Job, generation: Generation) -> None:
        job_id = self._job_id = next(self._job_ids)
        self.generation = generation
        generation.on_cancel = lambda: self.cancel(job_id)
        self._send(("job", job_id, job))

    def cancel(self, job_id: int) -> None:
        if self.alive and job_id == self._job_id:
            self._send(("cancel", job_id))

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:
            pass  # the worker died: the receiving thread reports it

    def _receive(self) -> None:
        """The worker's events, until it closes its end: then it ended on request or crashed."""
        try:
            while True:
                kind, job_id, value = self._conn.recv()
                generation = self.generation
                if generation is None or job_id != self._job_id:
                    continue  # a job already given up on
                if kind in ("end", "error"):
                    self.generation = None
                    generation.emit(kind, value)
                    self._call_on_loop(self._finished, time.monotonic() - generation.started)
                else:
                    generation.emit(kind, value)
        except (EOFError, OSError):
            pass
        self._died()

    def _finished(self, busy_seconds: float | None = None) -> None:
        if self.busy:
            self.busy = False
            self.engine.pool.release(self, busy_seconds)

    def _died(self) -> None:
        self.alive = False
        if self.engine.closing:
            return
        status = self._exit_status()
        generation, self.generation = self.generation, None
        if generation is not None:
            generation.emit("error", engine_failed(status))
        self._call_on_loop(self._crashed, status, generation is not None)

    def _crashed(self, status: str, during_request: bool) -> None:
        self._finished()  # the slot goes back to the pool: whoever takes it waits for the new worker
        self.engine.on_failure(self, status, during_request)

    def _call_on_loop(self, fn, *args) -> None:
        loop = self.engine.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _exit_status(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def _name(self) -> str:
        return f"the engine's worker process {self.pid} (slot {self.index})"

    def stop(self) -> None:
        """Close the connection (the worker stops at the next token and exits); kill it if it does not."""
        self.alive = False
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for closable in (self._conn, self._sock):
            if closable is not None:
                closable.close()
        self._conn = self._sock = None


def engine_failed(status: str) -> ApiError:
    return ApiError(
        500,
        f"the generation engine failed while answering this request: its worker process {status}; "
        "the engine is being restarted after the model is verified again",
        type="server_error",
        code="engine_failed",
    )


class Engine:
    def __init__(self, model: VerifiedModel, settings: EngineSettings):
        self.model = model
        self.settings = settings
        self.slots: list[Worker] = []
        self.pool: SlotPool[Worker] | None = None
        self.embeddings = (model.choice.entry.details or {}).get("architecture") in EMBEDDING_ARCHITECTURES
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.failed: str | None = None  # set when the server stops serving: requests waiting for a slot give up
        self.on_failure: Callable[[Worker, str, bool], None] = lambda worker, status, during_request: None

    # loading

    def load(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the workers (blocking: run it in a thread), then check what they loaded against what was verified."""
        self.loop = loop
        self.slots = [Worker(i, self) for i in range(self.settings.parallel)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=self._start, args=(w, errors)) for w in self.slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        loaded = self.slots[0].info.chat_template
        if loaded != self.model.chat_template:
            raise Refused(f"{self.model.choice.entry.path}: llama.cpp loaded a chat template that is not the verified one")
        self.model.ensure_unchanged()
        self.pool = SlotPool(self.slots, self.settings.max_queue)

    def _start(self, worker: Worker, errors: list[BaseException]) -> None:
        try:
            worker.start(self._worker_settings())
            self.check_loaded(worker)
        except Failure as e:
            errors.append(Failure(f"llama.cpp could not load {self.model.choice.entry.path}: {e}"))
        except BaseException as e:
            errors.append(e)

    def _worker_settings(self) -> WorkerSettings:
        s = self.settings
        return WorkerSettings(
            parts=tuple((f.name, f.fd) for f in self.model.opened),
            ctx_size=s.ctx_size,
            threads=s.threads,
            n_gpu_layers=s.n_gpu_layers,
            embedding=self.embeddings,
            logprobs=s.logprobs,
            chat_template=self.model.chat_template,
        )

    def check_loaded(self, worker: Worker | None = None) -> None:
        """Refused unless each live worker maps the verified inodes (and no other file under their names)."""
        for w in [worker] if worker else self.slots:
            if not w.alive:
                continue
            try:
                check_mapped(w.pid, list(self.model.opened), required=self.settings.n_gpu_layers == 0)
            except Refused:
                if w.proc.poll() is not None:  # it died just now (a zombie maps nothing): a crash, handled as one
                    continue
                raise

    def dead_workers(self) -> list[Worker]:
        return [w for w in self.slots if not w.alive]

    def respawn(self, worker: Worker) -> None:
        """Start a new process for a slot whose worker died (blocking), once the model has been verified again."""
        if self.closing:
            return
        worker.stop()
        worker.start(self._worker_settings())
        if self.closing:  # the server began shutting down meanwhile: close() may have missed this process
            worker.stop()
            return
        self.check_loaded(worker)
        if worker.info.chat_template != self.model.chat_template:
            raise Refused(f"{self.model.choice.entry.path}: llama.cpp loaded a chat template that is not the verified one")

    # running

    async def submit(self, job: Job) -> Generation:
        """Wait for a slot (FIFO; QueueFull when the line is full) and start `job` on it."""
        loop = asyncio.get_running_loop()
        worker = await self.pool.acquire()
        worker.busy = True
        try:
            while not worker.alive:  # its process died: a new one is being started
                if self.failed or self.closing:
                    reason = self.failed or "the server is shutting down"
                    raise ApiError(503, reason, type="server_error", code="not_ready")
                await asyncio.sleep(0.05)
        except BaseException:
            worker._finished()
            raise
        generation = Generation(loop)
        worker.submit(job, generation)
        return generation

    def cancel_all(self, reason: str) -> None:
        self.failed = self.failed or reason
        for worker in self.slots:
            if worker.generation is not None:
                worker.generation.cancel(reason)

    def close(self) -> None:
        self.cancel_all("the server is shutting down")
        self.closing = True
        for worker in self.slots:
            worker.stop()

    @property
    def context_size(self) -> int:
        loaded = next((w.info for w in self.slots if w.info), None)
        return loaded.n_ctx if loaded else self.settings.ctx_size


# what runs underneath


def gpu_layers(requested: int | None) -> tuple[int, str]:
    """(n_gpu_layers to pass to llama.cpp, a sentence saying which backend is used)."""
    import llama_cpp

    features = _cpu_features()
    if not llama_cpp.llama_supports_gpu_offload():
        note = " (--n-gpu-layers ignored)" if requested not in (None, 0) else ""
        return 0, f"backend: CPU only: this llama-cpp-python build has no GPU offload{note}; CPU features {features}"
    layers = -1 if requested is None else requested
    shown = "all layers" if layers == -1 else f"{layers} layer(s)"
    return layers, f"backend: GPU offload available in this llama-cpp-python build; offloading {shown}; CPU features {features}"


def _cpu_features() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    on = [name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", info) if value != "0"]
    return ", ".join(on) or "baseline"
