"""What one request generates on a loaded model: a `Job` (plain, picklable data) run on a Llama.

The engine decides *where* a job runs (which slot, which thread or process); this module decides
*what* it does with the model, so the two can change independently. A job's result is an
OpenAI-shaped dict, or an iterator of OpenAI-shaped stream chunks.

Chat and completion jobs both come down to llama-cpp-python's `create_completion`, run `n`
times on the same prompt (llama-cpp-python reuses the evaluated prompt): for a chat the
prompt is the token list of template.prompt_tokens, and the text that comes back is shaped
into chat messages, tool calls and chat logprobs by chat_output.py. Every grammar is checked
by llama.cpp's parser before a sampler is built from it (grammar.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

JobKind = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True)
class Job:
    kind: JobKind
    body: dict  # sovpack's plan around the generation, plain data (requests.py lists its keys)
    kwargs: dict  # the arguments for llama-cpp-python's create_completion / create_embedding


def run(llama, job: Job, stopping_criteria):
    """Run `job` on `llama`; `stopping_criteria` ends a generation whose client has gone."""
    if job.kind == "embedding":
        return llama.create_embedding(**job.kwargs)
    from sovpack.server import chat_output, grammar, template

    plan = job.body
    if plan.get("grammar"):
        grammar.check_on_model(llama, plan["grammar"], plan["grammar_param"])
    kwargs = dict(job.kwargs, logit_bias=_logit_bias(llama, plan))
    if job.kind == "chat":
        kwargs["prompt"] = template.prompt_tokens(llama, plan["messages"], plan["tools"])
    stream = bool(kwargs.get("stream"))
    choices = _choices(llama, plan, kwargs, stopping_criteria)
    if job.kind == "chat":
        tools = plan["tools"] is not None
        return (
            chat_output.chunks(choices, tools, plan["top_logprobs"])
            if stream
            else chat_output.result(list(choices), tools, plan["top_logprobs"])
        )
    return _completion_chunks(choices) if stream else _merged(list(choices))


def _choices(llama, plan: dict, kwargs: dict, stopping_criteria) -> Iterator:
    """Each of the n generations (results, or iterators of chunks), one after the other.

    The worker's CountingLlama (worker.py) counts the tokens of its last generation, and the worker reads
    the counts when a stream ends; with n > 1 they are left covering every choice.
    """
    from llama_cpp import LlamaGrammar, LogitsProcessorList, MinTokensLogitsProcessor

    completion_tokens = 0
    for index in range(plan["n"]):
        seed = plan.get("seed")
        kwargs_i = dict(kwargs, stopping_criteria=stopping_criteria, seed=None if seed is None else seed + index)
        if plan.get("grammar"):
            kwargs_i["grammar"] = LlamaGrammar.from_string(plan["grammar"], verbose=False)
        if plan.get("min_tokens"):
            kwargs_i["logits_processor"] = LogitsProcessorList([MinTokensLogitsProcessor(plan["min_tokens"], llama.token_eos())])
        yield index, llama.create_completion(**kwargs_i)
        completion_tokens += getattr(llama, "completion_tokens", 0)  # resumed once this choice was consumed
    if plan["n"] > 1:
        llama.completion_tokens = completion_tokens


def _logit_bias(llama, plan: dict) -> dict | None:
    from sovpack.server.errors import BadRequest

    bias = plan.get("logit_bias")
    if not bias:
        return None
    if plan.get("logit_bias_type") == "tokens":  # llama-cpp-python's extension: keys are token texts
        from llama_cpp.server.app import _logit_bias_tokens_to_input_ids

        return _logit_bias_tokens_to_input_ids(llama, bias)
    for key in bias:
        if int(key) >= llama.n_vocab():
            raise BadRequest(f"logit_bias: token id {key} is not in this model's vocabulary of {llama.n_vocab()}", "logit_bias")
    return {int(k): float(v) for k, v in bias.items()}


def _merged(results: list[tuple[int, dict]]) -> dict:
    """One completion response holding the n choices, with their usage added up."""
    first = results[0][1]
    choices = [_plain_choice(result["choices"][0], index) for index, result in results]
    completion_tokens = sum(result["usage"]["completion_tokens"] for _, result in results)
    prompt_tokens = first["usage"]["prompt_tokens"]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {**first, "choices": choices, "usage": usage | {"total_tokens": prompt_tokens + completion_tokens}}


def _completion_chunks(choices) -> Iterator[dict]:
    """The n streams as one: every chunk under the first one's id, each choice with its index."""
    first_id = None
    for index, chunks in choices:
        for chunk in chunks:
            first_id = first_id or chunk["id"]
            yield {**chunk, "id": first_id, "choices": [_plain_choice(c, index) for c in chunk["choices"]]}


def _plain_choice(choice: dict, index: int) -> dict:
    from sovpack.server.chat_output import plain_logprobs

    return dict(choice, index=index, logprobs=plain_logprobs(choice.get("logprobs")))
