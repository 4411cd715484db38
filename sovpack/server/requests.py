"""Request bodies: llama-cpp-python's OpenAI request types, plus sovpack's checks; each request becomes a Job.

The pydantic models of `llama_cpp.server.types` parse the sampling fields; sovpack takes
over the fields whose checks must name the right place (`messages`, `tools`,
`tool_choice`, `response_format`), adds `stream_options.include_usage` (a final usage chunk
in streams), `max_completion_tokens` (newer OpenAI clients send it instead of max_tokens)
and these checks, each answered with a 400 naming the field: the model must be the one
served (or an --alias); `n` from 1 to --max-n; `max_tokens` from 1 to the server's limit
(omitted: the limit for chat, 16 for completions, as in OpenAI's API); logprobs only when
the server runs with --logprobs; a chat needs at least one message; a completion one prompt.

A Job's `body` is sovpack's plan around llama-cpp-python's generation, as plain data:
`n`, `seed`, `min_tokens`, `logit_bias` (+ `logit_bias_type`), `grammar` (GBNF text, from the
client, a response_format or the tools) with `grammar_param` (the field it came from),
`top_logprobs` (chat: the number of alternatives wanted, None without logprobs), and for
chats `messages` (chat_messages.normalize) and `tools` (tools.plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest, CreateEmbeddingRequest
from pydantic import BaseModel

from sovpack.server import chat_messages, grammar, tools
from sovpack.server.errors import ApiError
from sovpack.server.generation import Job

# handled by sovpack (the plan), or not passed to llama-cpp-python at all
_PLANNED = {"n", "seed", "min_tokens", "logit_bias", "logit_bias_type", "grammar", "user", "stream_options"}
_CHAT_EXCLUDE = _PLANNED | {
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
}
_COMPLETION_EXCLUDE = _PLANNED | {"best_of"}
MAX_EMBEDDING_INPUTS = 256
MAX_TOP_LOGPROBS = 20
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LOGPROBS_OFF = "logprobs need the server started with --logprobs (it keeps every position's logits: see docs/serve.md)"


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(CreateChatCompletionRequest):
    # checked by chat_messages and tools, whose errors name the exact field
    messages: list[Any] = []
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[Any] = None
    stream_options: Optional[StreamOptions] = None
    max_completion_tokens: Optional[int] = None


class CompletionRequest(CreateCompletionRequest):
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = 16  # checked below, with a clearer message than a schema error


EmbeddingRequest = CreateEmbeddingRequest  # taken as is: sovpack adds no fields, only the checks below


@dataclass(frozen=True)
class Limits:
    model_id: str  # the bundle name
    model_aliases: frozenset[str]  # other names accepted in "model" (NAME@VERSION, --alias)
    max_tokens: int
    max_n: int = 1
    logprobs: bool = False  # the slots keep every position's logits (--logprobs)
    aliases: tuple[str, ...] = ()  # the --alias names (also in model_aliases), listed in /v1/models


def include_usage(body) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def chat_job(body: ChatRequest, limits: Limits) -> Job:
    check_model(body.model, limits)
    if body.functions is not None or body.function_call is not None:
        param = "functions" if body.functions is not None else "function_call"
        raise ApiError(400, f"{param} is deprecated and not supported: use tools and tool_choice", param=param)
    messages = chat_messages.normalize(body.messages)
    wanted, param = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    kwargs = body.model_dump(exclude=_CHAT_EXCLUDE)
    kwargs["max_tokens"] = check_max_tokens(wanted, limits, param)
    kwargs["model"] = limits.model_id
    top = _chat_logprobs(body, limits)
    kwargs["logprobs"] = top
    tool_plan = tools.plan(body.tools, body.tool_choice)
    plan = _common_plan(body, limits) | {"messages": messages, "tools": tool_plan, "top_logprobs": top}
    plan |= _constraint(body.grammar, body.response_format, tool_plan)
    return Job("chat", plan, kwargs)


def completion_job(body: CompletionRequest, limits: Limits) -> Job:
    check_model(body.model, limits)
    if body.best_of not in (None, 1):
        raise ApiError(400, f"best_of must be 1: this server does not rank candidates (got {body.best_of})", param="best_of")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, f"give one prompt per request (got a list of {len(body.prompt)})", param="prompt")
        body.prompt = body.prompt[0]
    if body.logprobs is not None:
        if not limits.logprobs:
            raise ApiError(400, LOGPROBS_OFF, param="logprobs", code="logprobs_disabled")
        if not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"logprobs must be from 0 to {MAX_TOP_LOGPROBS} (got {body.logprobs})", param="logprobs")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported: the prompt's own logprobs are not computed", param="echo")
    kwargs = body.model_dump(exclude=_COMPLETION_EXCLUDE)
    kwargs["max_tokens"] = check_max_tokens(body.max_tokens, limits, "max_tokens")
    kwargs["model"] = limits.model_id
    plan = _common_plan(body, limits) | _constraint(body.grammar, None, None)
    return Job("completion", plan, kwargs)


def embedding_job(body: EmbeddingRequest, limits: Limits) -> Job:
    check_model(body.model, limits)
    if isinstance(body.input, list) and not 1 <= len(body.input) <= MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBEDDING_INPUTS} strings", param="input")
    return Job("embedding", {}, {"input": body.input, "model": limits.model_id})


def _common_plan(body, limits: Limits) -> dict:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= limits.max_n:
        raise ApiError(
            400,
            f"n must be from 1 to {limits.max_n} on this server (its --max-n), got {n}",
            param="n",
            code="invalid_n",
        )
    if body.logit_bias is not None and body.logit_bias_type != "tokens":
        for key in body.logit_bias:
            if not key.isdigit():
                raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", param=f"logit_bias.{key}")
    return {
        "n": n,
        "seed": body.seed,
        "min_tokens": body.min_tokens,
        "logit_bias": body.logit_bias,
        "logit_bias_type": body.logit_bias_type,
    }


def _chat_logprobs(body: ChatRequest, limits: Limits) -> int | None:
    """The number of alternatives per token to report, or None when logprobs were not asked for."""
    if not body.logprobs:
        if body.top_logprobs is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    if not limits.logprobs:
        raise ApiError(400, LOGPROBS_OFF, param="logprobs", code="logprobs_disabled")
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS} (got {top})", param="top_logprobs")
    return top


def _constraint(raw_grammar: str | None, response_format: object, tool_plan: dict | None) -> dict:
    """The grammar that constrains the answer, and the field it came from."""
    from_format = _response_format_grammar(response_format)
    given = [name for name, value in (("grammar", raw_grammar), ("response_format", from_format), ("tools", tool_plan)) if value]
    if len(given) > 1:
        raise ApiError(400, f"{given[1]} cannot be combined with {given[0]}: give one of them", param=given[1])
    if raw_grammar:
        grammar.check_shape(raw_grammar, "grammar")
        return {"grammar": raw_grammar, "grammar_param": "grammar"}
    if from_format:
        return {"grammar": from_format[0], "grammar_param": from_format[1]}
    if tool_plan:
        return {"grammar": tool_plan["grammar"], "grammar_param": "tools"}
    return {"grammar": None, "grammar_param": None}


def _response_format_grammar(response_format: object) -> tuple[str, str] | None:
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", {"type": "object"})  # "schema": llama-cpp-python's extension
        return grammar.from_schema(schema, "response_format.schema"), "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ApiError(
                400, "response_format.json_schema must be an object with name and schema", param="response_format.json_schema"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not SCHEMA_NAME.match(name):
            raise ApiError(
                400,
                f"response_format.json_schema.name must be 1 to 64 letters, digits, _ or - (got {name!r})",
                param="response_format.json_schema.name",
            )
        if "schema" not in spec:
            raise ApiError(400, "response_format.json_schema.schema is required", param="response_format.json_schema.schema")
        param = "response_format.json_schema.schema"
        return grammar.from_schema(spec["schema"], param), param
    raise ApiError(
        400,
        f"response_format.type must be text, json_object or json_schema (got {kind!r})",
        param="response_format.type",
    )


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
