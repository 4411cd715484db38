"""From a generation to an HTTP answer: JSON, or server-sent events in OpenAI's stream format.

A request waits for a slot and then for its first output while watching its connection:
a client that leaves while queued gives up its place, one that leaves while its answer is
being computed stops the generation at the next token. A stream's status line is sent
only once the first chunk exists, so that errors found before generation (the prompt does
not fit the context, the chat template rejects the messages) are real HTTP errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from sovpack.server.access_log import RequestRecord
from sovpack.server.engine import Generation
from sovpack.server.errors import ApiError, ClientGone, from_engine
from sovpack.server.generation import Job
from sovpack.server.slots import QueueFull


async def generate(request: Request, state, job: Job, *, stream: bool, include_usage: bool, body) -> object:
    record: RequestRecord = request.state.record
    state.ensure_serving()
    queued = time.monotonic()
    try:
        generation = await until_disconnected(request, state.engine.submit(job))
    except QueueFull as e:
        raise ApiError(
            503,
            f"{e}; retry in {e.retry_after} s",
            type="server_error",
            code="queue_full",
            headers={"Retry-After": str(e.retry_after)},
        ) from None
    record.queue_ms = round((time.monotonic() - queued) * 1000, 1)
    kind, value = await until_disconnected(request, generation.next(), on_gone=generation.cancel)
    if kind == "error":
        raise from_engine(value, body)
    if generation.interrupted and not stream:
        raise interrupted(generation.interrupted)
    if not stream:
        usage = value.get("usage") or {}
        record.prompt_tokens, record.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        record.finish_reason = _finish_reason(value)
        return JSONResponse(value)
    record.ttft_ms = record.since_start_ms()
    return EventStream(generation, value, record, include_usage, stopping=lambda: state.status != "ready")


async def until_disconnected(request: Request, awaitable: Awaitable, on_gone: Callable[[], None] | None = None):
    """The awaitable's result, or ClientGone if the client closes the connection first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server gave up on this request (shutdown timeout)
        if on_gone:
            on_gone()
        raise
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.cancelled() and task.done():
        return task.result()
    if on_gone:
        on_gone()
    raise ClientGone()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    def __init__(
        self, generation: Generation, first: dict, record: RequestRecord, include_usage: bool, stopping: Callable[[], bool]
    ):
        self.generation, self.record, self.include_usage, self.stopping = generation, record, include_usage, stopping
        self.finished = False
        super().__init__(
            self._events(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self, first: dict):
        last = first
        yield _sse(first)
        while True:
            kind, value = await self.generation.next()
            if kind == "chunk":
                last = value
                yield _sse(value)
                continue
            if kind == "end" and self.generation.interrupted:
                error = interrupted(self.generation.interrupted)
                self.record.outcome, self.record.error = "error", error.code
                yield _sse(error.body())
            elif kind == "end":
                self.record.prompt_tokens, self.record.completion_tokens = value
                self.record.finish_reason = _finish_reason(last)
                if self.include_usage:
                    yield _sse(_usage_chunk(last, *value))
                yield b"data: [DONE]\n\n"
            else:
                error = from_engine(value)
                self.record.outcome, self.record.error = "error", error.code or error.type
                yield _sse(error.body())
            self.finished = True
            return

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.finished:
                self.generation.cancel()  # the slot is freed at the next token
                self.record.outcome = "cancelled" if self.stopping() else "client_disconnected"


def interrupted(reason: str) -> ApiError:
    return ApiError(503, f"the answer was cut short: {reason}", type="server_error", code="generation_interrupted")


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _finish_reason(response: dict) -> str | None:
    choices = response.get("choices") or [{}]
    return choices[0].get("finish_reason")


def _usage_chunk(last: dict, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": last.get("id"),
        "object": last.get("object"),
        "created": last.get("created"),
        "model": last.get("model"),
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
