"""The chat formatter: exactly the signed chat template, rendered in jinja2's sandbox.

llama-cpp-python, left to itself, compares a GGUF's template with a few it knows and may
swap in a built-in Python formatter ("chatml", "llama-3", ...) or fall back to "llama-2"
when there is none. sovpack builds the formatter explicitly from the verified template
text (verification.py checked its SHA-256 against the signed metadata; the engine checks
that llama.cpp loaded the same text) with llama-cpp-python's own Jinja2ChatFormatter (an
ImmutableSandboxedEnvironment). A model with no template gets a handler that refuses chat
requests instead of a guessed format.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_cpp import llama_chat_format
from llama_cpp.llama import StoppingCriteriaList


class NoChatTemplate(ValueError):
    """The served GGUF carries no chat template: only /v1/completions can be used."""


class VerifiedChatFormatter(llama_chat_format.Jinja2ChatFormatter):
    """Jinja2ChatFormatter over the signed template, plus a stop check (client gone, shutdown)."""

    def __init__(self, template: str, *, eos_token: str, bos_token: str, eos_token_id: int, should_stop: Callable[[], bool]):
        super().__init__(template=template, eos_token=eos_token, bos_token=bos_token, stop_token_ids=[eos_token_id])
        self._should_stop = should_stop

    def __call__(self, **kwargs) -> llama_chat_format.ChatFormatterResponse:
        response = super().__call__(**kwargs)
        criteria = StoppingCriteriaList(response.stopping_criteria or [])
        criteria.append(lambda tokens, logits: self._should_stop())
        response.stopping_criteria = criteria
        return response


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
    return formatter.to_chat_handler()


def _refuse_chat(**kwargs):
    raise NoChatTemplate("this model's GGUF carries no chat template, so it cannot serve chat completions; use /v1/completions")
