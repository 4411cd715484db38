"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

import json
import re


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)

    def encoded(self) -> bytes:
        return json.dumps(self.body()).encode()


class BadRequest(ValueError):
    """A 400 found where a job runs (maybe in another process): plain arguments, so that it pickles."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param, code)
        self.message, self.param, self.code = message, param, code

    def __str__(self) -> str:
        return self.message

    def api_error(self) -> ApiError:
        return ApiError(400, self.message, param=self.param, code=self.code)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send it as `Authorization: Bearer KEY`",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def not_serving(status: str) -> ApiError:
    reason = {
        "loading": "the model is still loading; retry shortly",
        "stopping": "the server is shutting down",
    }.get(status, f"the server is not serving ({status})")
    headers = {"Retry-After": "2"} if status == "loading" else {}
    return ApiError(503, reason, type="server_error", code="not_ready", headers=headers)


_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def from_engine(exc: BaseException, body=None) -> ApiError:
    """Map an exception raised while generating to the error the client gets."""
    from jinja2 import TemplateError

    from sovpack.server.template import NoChatTemplate

    if isinstance(exc, ApiError):  # already an answer (e.g. engine_failed, when a worker process dies)
        return exc
    text = str(exc)
    match = _CONTEXT.search(text)
    if match:
        prompt, context = int(match.group(1)), int(match.group(2))
        param = "messages" if hasattr(body, "messages") else "prompt"
        return ApiError(
            400,
            f"the prompt is {prompt} tokens long but this server's context is {context} tokens; "
            f"shorten the {param} (the server's --ctx-size sets the context)",
            code="context_length_exceeded",
            param=param,
        )
    if isinstance(exc, BadRequest):
        return exc.api_error()
    if isinstance(exc, NoChatTemplate):
        return ApiError(400, text, code="chat_not_supported", param="messages")
    if isinstance(exc, TemplateError):
        return ApiError(400, f"the model's chat template rejected these messages: {text}", param="messages")
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, text)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {text}", type="server_error")
