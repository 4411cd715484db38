"""The chat prompt: exactly the signed chat template, rendered in jinja2's sandbox, tokenized so that
control tokens come only from the template.

llama-cpp-python, left to itself, compares a GGUF's template with a few it knows and may
swap in a built-in Python formatter ("chatml", "llama-3", ...) or fall back to "llama-2"
when there is none. sovpack builds the formatter explicitly from the verified template
text (verification.py checked its SHA-256 against the signed metadata; the engine checks
that llama.cpp loaded the same text) with llama-cpp-python's own Jinja2ChatFormatter (an
ImmutableSandboxedEnvironment). A model with no template gets a handler that refuses chat
requests instead of a guessed format.

Tokenizing the rendered prompt as one string with special-token parsing on (what
llama-cpp-python and llama.cpp's server do) would turn `<|im_end|>` typed by a user into
the model's real end-of-turn token: the user could write their own system turn. So the
template is rendered with each message's text replaced by a marker (its leading and
trailing whitespace kept, so that templates that `trim` behave the same); the markup
between markers is tokenized with special tokens recognised, and each message's text as
plain text. A template that cuts a marker apart (it slices or splits the content) is
rendered with the real text instead, which is then accepted only if no message holds the
text of a control token. Tool definitions and earlier tool calls that a template renders
itself (as JSON) must not hold control-token text either.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from llama_cpp import llama_chat_format
from llama_cpp.llama import StoppingCriteriaList

from sovpack.server import tools as tool_calls
from sovpack.server.errors import BadRequest


class NoChatTemplate(ValueError):
    """The served GGUF carries no chat template: only /v1/completions can be used."""


class VerifiedChatFormatter(llama_chat_format.Jinja2ChatFormatter):
    """Jinja2ChatFormatter over the signed template, plus a stop check (client gone, shutdown).

    Called as llama-cpp-python's chat handler it formats as llama-cpp-python does; sovpack's
    own requests go through `prompt_tokens` instead (generation.py).
    """

    def __init__(self, template: str, *, eos_token: str, bos_token: str, eos_token_id: int, should_stop: Callable[[], bool]):
        super().__init__(template=template, eos_token=eos_token, bos_token=bos_token, stop_token_ids=[eos_token_id])
        self._should_stop = should_stop
        self.renders_tools = "tools" in template
        self.renders_tool_calls = "tool_calls" in template

    def __call__(self, **kwargs) -> llama_chat_format.ChatFormatterResponse:
        response = super().__call__(**kwargs)
        criteria = StoppingCriteriaList(response.stopping_criteria or [])
        criteria.append(lambda tokens, logits: self._should_stop())
        response.stopping_criteria = criteria
        return response

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        return super().__call__(messages=messages, tools=tools).prompt


class ChatHandler:
    """llama-cpp-python's chat handler protocol, with the formatter kept at hand for `prompt_tokens`."""

    def __init__(self, formatter: VerifiedChatFormatter):
        self.formatter = formatter
        self._handler = formatter.to_chat_handler()

    def __call__(self, **kwargs):
        return self._handler(**kwargs)


def chat_handler(llama, template: str | None, should_stop: Callable[[], bool]):
    """A llama-cpp-python chat completion handler for `llama`, from the verified template (None: no chat)."""
    if template is None:
        return _refuse_chat
    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    formatter = VerifiedChatFormatter(
        template,
        eos_token=llama._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llama._model.token_get_text(bos_id) if bos_id != -1 else "",
        eos_token_id=eos_id,
        should_stop=should_stop,
    )
    return ChatHandler(formatter)


def _refuse_chat(**kwargs):
    raise NoChatTemplate("this model's GGUF carries no chat template, so it cannot serve chat completions; use /v1/completions")


# the prompt


def prompt_tokens(llama, messages: list[dict], tools: dict | None) -> list[int]:
    """The chat prompt's tokens: template markup with control tokens, message text as plain text."""
    handler = llama.chat_handler
    if not isinstance(handler, ChatHandler):
        _refuse_chat()
    formatter = handler.formatter
    messages = _with_tools(messages, tools, formatter)
    template_tools = tools["tools"] if tools and formatter.renders_tools else None
    _refuse_control_text(llama, template_tools, "tools")
    if formatter.renders_tool_calls:
        for i, m in enumerate(messages):
            _refuse_control_text(llama, m.get("tool_calls"), f"messages.{i}.tool_calls")
    nonce = secrets.token_hex(8)
    texts: list[str] = []
    marked = [_marked(m, texts, nonce) for m in messages]
    rendered = formatter.render(marked, template_tools)
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
    if any("\ue000" in piece or "\ue001" in piece for piece in pieces[::2]):  # a marker cut apart or changed
        return _unmarked_tokens(llama, formatter, messages, template_tools)
    tokens: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            tokens += llama.tokenize(texts[int(piece)].encode("utf-8"), add_bos=False, special=False)
        elif piece:
            tokens += llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
    return tokens


def _with_tools(messages: list[dict], tools: dict | None, formatter: VerifiedChatFormatter) -> list[dict]:
    """Tools and earlier tool calls put where this template can show them."""
    shown = []
    for m in messages:
        if m.get("tool_calls") and formatter.renders_tool_calls:
            m = {**m, "tool_calls": tool_calls.for_template(m["tool_calls"])}
        elif m.get("tool_calls"):
            calls = tool_calls.as_text(m["tool_calls"])
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{m['content']}\n{calls}" if m.get("content") else calls
        if m.get("content") is None:
            m = {**m, "content": ""}
        shown.append(m)
    if tools and not formatter.renders_tools:
        text = tool_calls.instructions(tools["tools"], tools["mode"])
        if shown[0]["role"] == "system":
            shown[0] = {**shown[0], "content": f"{shown[0]['content']}\n\n{text}"}
        else:
            shown.insert(0, {"role": "system", "content": text})
    return shown


def _marked(message: dict, texts: list[str], nonce: str) -> dict:
    marked = dict(message)
    for field in ("content", "name"):
        value = message.get(field)
        if isinstance(value, str) and value.strip():
            core = value.strip()
            lead, trail = value[: len(value) - len(value.lstrip())], value[len(value.rstrip()) :]
            marked[field] = f"{lead}\ue000{nonce}:{len(texts)}\ue001{trail}"
            texts.append(core)
    return marked


def _unmarked_tokens(llama, formatter, messages: list[dict], template_tools) -> list[int]:
    for i, m in enumerate(messages):
        for field in ("content", "name"):
            _refuse_control_text(llama, m.get(field), f"messages.{i}.{field}")
    return llama.tokenize(formatter.render(messages, template_tools).encode("utf-8"), add_bos=False, special=True)


def _refuse_control_text(llama, value, param: str) -> None:
    """400 when `value` (a string, or strings inside lists and objects) holds the text of a control token."""
    for text in _strings(value):
        data = text.encode("utf-8")
        if llama.tokenize(data, add_bos=False, special=True) != llama.tokenize(data, add_bos=False, special=False):
            raise BadRequest(
                f"{param} holds the text of one of the model's control tokens (like its end-of-turn marker), which this "
                "chat template would pass to the model as markup; remove it",
                param,
                "control_token_text",
            )


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
