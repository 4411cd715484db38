"""The generation engine: N llama-cpp-python contexts ("slots") over one verified GGUF.

Each slot is a `llama_cpp.Llama` with its own context and KV cache; llama.cpp memory-maps
the weights, so N slots share one copy of them in the page cache. Each slot runs its
requests on its own worker thread (llama.cpp releases the GIL while it computes), one
request at a time; the SlotPool in front decides who runs next. A request's output flows
back to the event loop as events ("chunk", "result", "end", "error"), so a slow client
never stalls generation and a client that leaves only sets a flag: the slot's stop
check ends the generation at the next token and the slot is handed back.

What llama-cpp-python provides and is used as is: `Llama.create_chat_completion` and
`create_completion` (OpenAI-shaped results and stream chunks), `create_embedding`, its
chat formatter and handler machinery, and its server's request preparation
(`prepare_request_resources`: logit_bias, grammar, min_tokens), called by generation.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llama_cpp
from llama_cpp.llama import StoppingCriteriaList

from sovpack.errors import Failure, Refused
from sovpack.server.generation import Job, run
from sovpack.server.slots import SlotPool
from sovpack.server.template import chat_handler
from sovpack.server.verification import VerifiedModel

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


@dataclass(frozen=True)
class EngineSettings:
    ctx_size: int
    parallel: int
    threads: int  # per slot
    n_gpu_layers: int
    max_queue: int
    logprobs: bool = False  # logits_all: every position's logits kept, for requests' logprobs (--logprobs)


class Slot:
    def __init__(self, index: int):
        self.llama: CountingLlama | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sovpack-slot{index}")
        self.job: Generation | None = None

    def should_stop(self) -> bool:
        job = self.job
        return job is not None and job.cancelled

    def stopping_criteria(self) -> StoppingCriteriaList:
        return StoppingCriteriaList([lambda tokens, logits: self.should_stop()])


class Generation:
    """One request on one slot: the worker thread emits events, the event loop reads them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
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
        self.cancelled = True


class Engine:
    def __init__(self, model: VerifiedModel, settings: EngineSettings):
        self.model = model
        self.settings = settings
        self.slots: list[Slot] = []
        self.pool: SlotPool[Slot] | None = None
        self.embeddings = (model.choice.entry.details or {}).get("architecture") in EMBEDDING_ARCHITECTURES

    # loading

    def load(self) -> None:
        """Create the slots (blocking: run it in a thread), then re-check the files just loaded."""
        self.slots = [self._load_slot(i) for i in range(self.settings.parallel)]
        self.model.ensure_unchanged()
        loaded = self.slots[0].llama.metadata.get("tokenizer.chat_template")
        if loaded != self.model.chat_template:
            raise Refused(f"{self.model.choice.entry.path}: llama.cpp loaded a chat template that is not the verified one")
        self.pool = SlotPool(self.slots, self.settings.max_queue)

    def _load_slot(self, index: int) -> Slot:
        slot = Slot(index)
        s = self.settings
        try:
            slot.llama = CountingLlama(
                model_path=str(self.model.gguf_path),
                n_ctx=s.ctx_size,
                n_threads=s.threads,
                n_threads_batch=s.threads,
                n_gpu_layers=s.n_gpu_layers,
                embedding=self.embeddings,
                logits_all=s.logprobs,
                chat_handler=_no_chat_yet,  # never let llama-cpp-python guess a chat format
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:  # a verified file llama.cpp cannot run: not a refusal
            raise Failure(f"llama.cpp could not load {self.model.choice.entry.path}: {e}") from None
        slot.llama.chat_handler = chat_handler(slot.llama, self.model.chat_template, slot.should_stop)
        return slot

    # running

    async def submit(self, job: Job) -> Generation:
        """Wait for a slot (FIFO; QueueFull when the line is full) and start `job` on it."""
        loop = asyncio.get_running_loop()
        slot = await self.pool.acquire()
        generation = Generation(loop)
        slot.job = generation
        loop.run_in_executor(slot.executor, self._run, loop, slot, generation, job)
        return generation

    def _run(self, loop, slot: Slot, generation: Generation, job: Job) -> None:
        result = None
        try:
            result = run(slot.llama, job, slot.stopping_criteria())
            if isinstance(result, dict):
                generation.emit("result", result)
            else:
                for chunk in result:
                    generation.emit("chunk", chunk)
            generation.emit("end", (slot.llama.prompt_tokens, slot.llama.completion_tokens))
        except Exception as e:  # reported to the client; the slot stays usable
            generation.emit("error", e)
        finally:
            if hasattr(result, "close"):
                result.close()
            slot.job = None
            loop.call_soon_threadsafe(self.pool.release, slot, time.monotonic() - generation.started)

    def cancel_all(self, reason: str) -> None:
        for slot in self.slots:
            if slot.job is not None:
                slot.job.cancel(reason)

    def close(self) -> None:
        self.cancel_all("the server is shutting down")
        for slot in self.slots:
            slot.executor.shutdown(wait=True)
            if slot.llama is not None:
                slot.llama.close()

    @property
    def context_size(self) -> int:
        return self.slots[0].llama.n_ctx() if self.slots else self.settings.ctx_size


def _no_chat_yet(**kwargs):
    raise RuntimeError("chat handler not installed")


# what runs underneath


def gpu_layers(requested: int | None) -> tuple[int, str]:
    """(n_gpu_layers to pass to llama.cpp, a sentence saying which backend is used)."""
    features = _cpu_features()
    if not llama_cpp.llama_supports_gpu_offload():
        note = " (--n-gpu-layers ignored)" if requested not in (None, 0) else ""
        return 0, f"backend: CPU only: this llama-cpp-python build has no GPU offload{note}; CPU features {features}"
    layers = -1 if requested is None else requested
    shown = "all layers" if layers == -1 else f"{layers} layer(s)"
    return layers, f"backend: GPU offload available in this llama-cpp-python build; offloading {shown}; CPU features {features}"


def _cpu_features() -> str:
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    on = [name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", info) if value != "0"]
    return ", ".join(on) or "baseline"
