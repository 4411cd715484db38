"""From llama-cpp-python completions to OpenAI chat answers: messages or stream deltas, tool calls, logprobs.

No model is needed here: this is shaping only. A request with tools gets its answer parsed
as a tool call when it is one (tools.py says how); its finish_reason is then "tool_calls".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sovpack.server.tools import CallStream, new_call_id, parse_call


def result(choices: list[tuple[int, dict]], tools: bool, top_logprobs: int | None) -> dict:
    """The chat.completion object for n finished completions (same prompt, so one prompt_tokens)."""
    first = choices[0][1]
    completion_tokens = sum(completion["usage"]["completion_tokens"] for _, completion in choices)
    prompt_tokens = first["usage"]["prompt_tokens"]
    return {
        "id": "chat" + first["id"],
        "object": "chat.completion",
        "created": first["created"],
        "model": first["model"],
        "choices": [_choice(index, completion["choices"][0], tools, top_logprobs) for index, completion in choices],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _choice(index: int, choice: dict, tools: bool, top: int | None) -> dict:
    text, finish = choice["text"], choice["finish_reason"]
    call = parse_call(text) if tools else None
    if call:
        name, arguments = call
        call_item = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
        message = {"role": "assistant", "content": None, "tool_calls": [call_item]}
        finish = "tool_calls" if finish == "stop" else finish
    else:
        message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": chat_logprobs(choice.get("logprobs"), top), "finish_reason": finish}


def chunks(choices: Iterable[tuple[int, Iterator[dict]]], tools: bool, top_logprobs: int | None) -> Iterator[dict]:
    """chat.completion.chunk objects for n streamed completions, one choice after the other."""
    head = None
    for index, stream in choices:
        calls = CallStream() if tools else None
        opened = False
        for chunk in stream:
            head = head or {"id": "chat" + chunk["id"], "object": "chat.completion.chunk", "created": chunk["created"]}
            if not opened:
                opened = True
                yield _chunk(head, chunk, index, {"role": "assistant", "content": None if tools else ""}, None, None)
            choice = chunk["choices"][0]
            text = choice.get("text") or ""
            delta = calls.feed(text) if calls is not None else ({"content": text} if text else None)
            logprobs = chat_logprobs(choice.get("logprobs"), top_logprobs)
            finish = choice.get("finish_reason")
            if finish is not None and calls is not None:
                delta = _join(delta, calls.finish())
                finish = "tool_calls" if calls.is_call and finish == "stop" else finish
            if delta or logprobs:
                yield _chunk(head, chunk, index, delta or {}, logprobs, None)
            if finish is not None:
                yield _chunk(head, chunk, index, {}, None, finish)


def _chunk(head: dict, chunk: dict, index: int, delta: dict, logprobs, finish) -> dict:
    return {
        "id": head["id"],
        "object": head["object"],
        "created": head["created"],
        "model": chunk["model"],
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def _join(delta: dict | None, closing: dict | None) -> dict | None:
    if not delta or not closing:
        return delta or closing
    if "content" in delta and "content" in closing:
        return {"content": delta["content"] + closing["content"]}
    if "tool_calls" in delta and "tool_calls" in closing:
        first, last = delta["tool_calls"][0], closing["tool_calls"][0]
        merged = {
            **first,
            "function": {**first["function"], "arguments": first["function"]["arguments"] + last["function"]["arguments"]},
        }
        return {"tool_calls": [merged]}
    return closing


def chat_logprobs(logprobs: dict | None, top: int | None) -> dict | None:
    """llama-cpp-python's completion logprobs in the chat shape (`content`: one entry per token)."""
    if not logprobs:
        return None
    content = []
    for token, logprob, alternatives in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: kv[1], reverse=True)
        if top is not None:
            ranked = ranked[:top]
        content.append(
            {
                "token": token,
                "logprob": float(logprob),
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [{"token": t, "logprob": float(lp), "bytes": list(t.encode("utf-8"))} for t, lp in ranked],
            }
        )
    return {"content": content, "refusal": None}


def plain_logprobs(logprobs: dict | None) -> dict | None:
    """Completion logprobs with Python floats (llama-cpp-python gives numpy float32, which JSON cannot encode)."""
    if not logprobs:
        return logprobs
    return {
        **logprobs,
        "token_logprobs": [None if lp is None else float(lp) for lp in logprobs["token_logprobs"]],
        "top_logprobs": [
            None if top is None else {token: float(lp) for token, lp in top.items()} for top in logprobs["top_logprobs"]
        ],
    }
