"""What one request generates on a loaded model: a `Job` (plain, picklable data) run on a Llama.

The engine decides *where* a job runs (which slot, which thread or process); this module decides
*what* it does with the model, so the two can change independently. A job's result is an
OpenAI-shaped dict, or an iterator of OpenAI-shaped stream chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_cpp.server.app import prepare_request_resources

JobKind = Literal["chat", "completion", "embedding"]


@dataclass(frozen=True)
class Job:
    kind: JobKind
    body: object  # the validated request (requests.py), for llama-cpp-python's own request preparation
    kwargs: dict  # the arguments for llama-cpp-python, after sovpack's limits (requests.py)


def run(llama, job: Job, stopping_criteria):
    """Run `job` on `llama`; `stopping_criteria` ends a generation whose client has gone."""
    if job.kind == "embedding":
        return llama.create_embedding(**job.kwargs)
    kwargs = dict(job.kwargs)
    llama = prepare_request_resources(job.body, lambda _model: llama, job.body.model, kwargs)
    if job.kind == "chat":  # the slot's stop check comes with the chat formatter (template.py)
        return llama.create_chat_completion(**kwargs)
    return llama.create_completion(**kwargs, stopping_criteria=stopping_criteria)
