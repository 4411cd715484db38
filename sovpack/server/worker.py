"""The engine's worker process: one llama.cpp context (a "slot") that runs one Job at a time.

Started by engine.py as `python -m sovpack.server.worker FD` with the verified GGUF's
descriptors inherited: it loads `/proc/self/fd/N`, the very inode that was hashed, never a
path. Whatever llama.cpp does (segfault, abort, out of memory), only this process dies; the
server answers the request it was running with `engine_failed` and starts a new worker after
verifying the files again.

Protocol, pickled messages over the socket FD (multiprocessing.connection framing):
  server -> worker: WorkerSettings first; then ("job", id, Job) and ("cancel", id)
  worker -> server: ("loaded", LoadedInfo) or ("load_failed", message); then per job
                    ("chunk", id, chunk)..., or ("result", id, dict); then ("end", id,
                    (prompt_tokens, completion_tokens)), or ("error", id, exception)
End of file on the socket (the server closed it or died) stops the generation at the next
token and ends the process. SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a
service manager's stop reaches the whole process group, and the server, which handles
them, lets running requests finish before it stops its workers (killing them after a grace
period if they do not end).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection


@dataclass(frozen=True)
class WorkerSettings:
    parts: tuple[tuple[str, int], ...]  # (file name, inherited descriptor) of each GGUF part, the first one loaded
    ctx_size: int
    threads: int
    n_gpu_layers: int
    embedding: bool
    logprobs: bool  # logits_all: every position's logits kept, for requests' logprobs (--logprobs)
    chat_template: str | None  # the verified template text the chat formatter is built from


@dataclass(frozen=True)
class LoadedInfo:
    n_ctx: int
    chat_template: str | None  # as llama.cpp read it from the file


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or systemd stopping the whole group: the server stops its workers
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    settings: WorkerSettings = conn.recv()
    try:
        llama = load(settings)
    except Exception as e:  # reported, and the server decides (exit 3 at start-up)
        message = str(e).replace(f"/proc/self/fd/{settings.parts[0][1]}", settings.parts[0][0])
        conn.send(("load_failed", f"{type(e).__name__}: {message}"))
        return 3
    conn.send(("loaded", LoadedInfo(llama.n_ctx(), llama.metadata.get("tokenizer.chat_template"))))
    JobLoop(conn, llama, settings).run()
    return 0


def load(settings: WorkerSettings):
    import llama_cpp

    from sovpack.server.template import chat_handler

    class CountingLlama(llama_cpp.Llama):
        """A Llama that counts the tokens of its last generation (stream chunks carry no usage)."""

        prompt_tokens = 0
        completion_tokens = 0

        def generate(self, tokens, *args, **kwargs):
            self.prompt_tokens, self.completion_tokens = len(tokens), 0
            for token in super().generate(tokens, *args, **kwargs):
                if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                    self.completion_tokens += 1
                yield token

    with _model_path(settings.parts) as path:
        llama = CountingLlama(
            model_path=path,
            n_ctx=settings.ctx_size,
            n_threads=settings.threads,
            n_threads_batch=settings.threads,
            n_gpu_layers=settings.n_gpu_layers,
            embedding=settings.embedding,
            logits_all=settings.logprobs,
            chat_handler=_no_chat_yet,  # never let llama-cpp-python guess a chat format
            verbose=False,
        )
    llama.stop_check = lambda: False  # replaced by JobLoop
    llama.chat_handler = chat_handler(llama, settings.chat_template, lambda: llama.stop_check())
    return llama


@contextlib.contextmanager
def _model_path(parts: tuple[tuple[str, int], ...]):
    """A path to the inherited descriptors: /proc/self/fd/N, or for a split model links named as llama.cpp expects."""
    if len(parts) == 1:
        yield f"/proc/self/fd/{parts[0][1]}"
        return
    with tempfile.TemporaryDirectory(prefix="sovpack-worker-") as directory:  # mode 0700
        for name, fd in parts:
            os.symlink(f"/proc/self/fd/{fd}", os.path.join(directory, os.path.basename(name)))
        yield os.path.join(directory, os.path.basename(parts[0][0]))


def _no_chat_yet(**kwargs):
    raise RuntimeError("chat handler not installed")


class JobLoop:
    def __init__(self, conn: Connection, llama, settings: WorkerSettings):
        self.conn, self.llama = conn, llama
        self.jobs: queue.Queue = queue.Queue()
        self.cancelled: set[int] = set()
        self.current: int | None = None
        self.server_gone = False
        llama.stop_check = self.should_stop

    def should_stop(self) -> bool:
        return self.server_gone or self.current in self.cancelled

    def receive(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "job":
                    self.jobs.put(message[1:])
                elif message[0] == "cancel":
                    self.cancelled.add(message[1])
        except (EOFError, OSError):
            self.server_gone = True
            self.jobs.put(None)

    def run(self) -> None:
        from llama_cpp.llama import StoppingCriteriaList

        threading.Thread(target=self.receive, daemon=True, name="sovpack-worker-receive").start()
        stopping = StoppingCriteriaList([lambda tokens, logits: self.should_stop()])
        while (item := self.jobs.get()) is not None:
            job_id, job = item
            self.current = job_id
            self.cancelled = {i for i in self.cancelled if i >= job_id}
            try:
                self.run_job(job_id, job, stopping)
            except OSError:  # the server is gone: nobody to answer
                return

    def run_job(self, job_id: int, job, stopping) -> None:
        from sovpack.server.generation import run

        result = None
        try:
            result = run(self.llama, job, stopping)
            if isinstance(result, dict):
                self.conn.send(("result", job_id, result))
            else:
                for chunk in result:
                    self.conn.send(("chunk", job_id, chunk))
            self.conn.send(("end", job_id, (self.llama.prompt_tokens, self.llama.completion_tokens)))
        except OSError:
            raise
        except Exception as e:  # reported to the client; the worker stays usable
            self.conn.send(("error", job_id, portable(e)))
        finally:
            if hasattr(result, "close"):
                result.close()


def portable(error: BaseException):
    """What to send for `error`: itself if it survives pickling (the server maps it by type), else its kind and text."""
    import pickle

    from jinja2 import TemplateError

    from sovpack.server.errors import ApiError

    if isinstance(error, ApiError):  # keyword-only fields: rebuilt field by field on the server's side
        return _Rebuilt(_api_error, (error.status, error.message, error.type, error.code, error.param, error.headers))
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        pass
    text = str(error)
    for kind in (TemplateError, ValueError, TypeError):
        if isinstance(error, kind):
            return kind(text)
    return RuntimeError(f"{type(error).__name__}: {text}")


class _Rebuilt:
    """Pickles as a call that rebuilds an object on the receiving side."""

    def __init__(self, rebuild, args: tuple):
        self.rebuild, self.args = rebuild, args

    def __reduce__(self):
        return self.rebuild, self.args


def _api_error(status, message, type, code, param, headers):
    from sovpack.server.errors import ApiError

    return ApiError(status, message, type=type, code=code, param=param, headers=headers)


if __name__ == "__main__":  # run as the module, not as __main__, so that what it pickles names sovpack.server.worker
    from sovpack.server.worker import main as worker_main

    sys.exit(worker_main(sys.argv[1:]))
