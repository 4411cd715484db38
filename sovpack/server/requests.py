"""Request bodies: llama-cpp-python's OpenAI request types, plus sovpack's limits on them.

The pydantic models of `llama_cpp.server.types` parse the bodies; sovpack adds
`stream_options.include_usage` (a final usage chunk in streams), `max_completion_tokens`
(newer OpenAI clients send it instead of max_tokens) and these checks, each answered with
a 400 naming the field: the model must be the one served; `n` (and `best_of`) must be
1; `max_tokens` must be 1 to the server's limit (omitted: the limit for chat, 16 for
completions, as in OpenAI's API); a chat needs at least one message; a completion one
prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest
from pydantic import BaseModel

from sovpack.server.errors import ApiError

# what llama-cpp-python's own server leaves out of the keyword arguments, and sovpack's additions
_CHAT_EXCLUDE = {"n", "logit_bias_type", "user", "min_tokens", "stream_options", "max_completion_tokens"}
_COMPLETION_EXCLUDE = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "stream_options"}
MAX_EMBEDDING_INPUTS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(CreateChatCompletionRequest):
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[int] = None


class CompletionRequest(CreateCompletionRequest):
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = 16  # checked below, with a clearer message than a schema error


EmbeddingRequest = CreateEmbeddingRequest  # taken as is: sovpack adds no fields, only the checks below


@dataclass(frozen=True)
class Limits:
    model_id: str  # the bundle name
    model_aliases: frozenset[str]  # other names accepted in "model" (NAME@VERSION)
    max_tokens: int


def include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def chat_kwargs(body: ChatRequest, limits: Limits) -> dict:
    check_model(body.model, limits)
    _check_one("n", body.n)
    if not body.messages:
        raise ApiError(400, "messages is required: give at least one message", param="messages", code="missing_messages")
    wanted, param = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    kwargs = body.model_dump(exclude=_CHAT_EXCLUDE)
    kwargs["max_tokens"] = check_max_tokens(wanted, limits, param)
    kwargs["model"] = limits.model_id
    return kwargs


def completion_kwargs(body: CompletionRequest, limits: Limits) -> dict:
    check_model(body.model, limits)
    _check_one("n", body.n)
    _check_one("best_of", body.best_of)
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, f"give one prompt per request (got a list of {len(body.prompt)})", param="prompt")
        body.prompt = body.prompt[0]
    kwargs = body.model_dump(exclude=_COMPLETION_EXCLUDE)
    kwargs["max_tokens"] = check_max_tokens(body.max_tokens, limits, "max_tokens")
    kwargs["model"] = limits.model_id
    return kwargs


def embedding_kwargs(body: EmbeddingRequest, limits: Limits) -> dict:
    check_model(body.model, limits)
    if isinstance(body.input, list) and not 1 <= len(body.input) <= MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} strings", param="input")
    return {"input": body.input, "model": limits.model_id}


def check_model(model: str | None, limits: Limits) -> None:
    if model in (None, "", limits.model_id) or model in limits.model_aliases:
        return
    raise ApiError(
        404,
        f"the model {model!r} does not exist on this server; it serves {limits.model_id!r} (see /v1/models)",
        param="model",
        code="model_not_found",
    )


def check_max_tokens(value: int | None, limits: Limits, param: str) -> int:
    if value is None:
        return limits.max_tokens
    if not 1 <= value <= limits.max_tokens:
        raise ApiError(
            400,
            f"{param} must be from 1 to {limits.max_tokens} on this server, got {value}",
            param=param,
            code="invalid_max_tokens",
        )
    return value


def _check_one(param: str, value: int | None) -> None:
    if value not in (None, 1):
        raise ApiError(400, f"{param} must be 1: this server returns one choice per request (got {value})", param=param)
