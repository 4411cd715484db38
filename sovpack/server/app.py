"""The HTTP API: OpenAI-compatible routes, /health and /metrics, and the ASGI layers around them.

llama-cpp-python's own FastAPI app (llama_cpp.server.app) is not mounted: it keeps the
model in module globals, allows every CORS origin, compares its single API key with `==`,
and interrupts a running stream when another request arrives. The routes here reuse its
request types, its request preparation and the Llama completion functions instead.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from sovpack.bundle.metadata import format_time
from sovpack.server.errors import ApiError, BadRequest, ClientGone, error_body
from sovpack.server.middleware import AccessRecordMiddleware, ApiKeyMiddleware, BodyLimitMiddleware
from sovpack.server.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_job,
    check_model,
    completion_job,
    embedding_job,
    include_usage,
)
from sovpack.server.responses import generate
from sovpack.server.security import browser_sdk_cors
from sovpack.server.state import ServerState


def create_app(state: ServerState):
    api = FastAPI(title="sovpack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=state.lifespan)
    _add_routes(api, state)
    _add_error_handlers(api)
    app = BodyLimitMiddleware(api, state.max_request_bytes)
    app = ApiKeyMiddleware(app, state.keys)
    if state.cors_origins:
        app = browser_sdk_cors(app, state.cors_origins)
    return AccessRecordMiddleware(app, state)


def _add_routes(api: FastAPI, state: ServerState) -> None:
    @api.get("/health")
    async def health():
        ready = state.status == "ready"  # the status only: without a key, nothing about the model
        return JSONResponse(
            {"status": state.status}, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "2"}
        )

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.gauges()), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models():
        names = [state.limits.model_id, *state.limits.aliases]
        return {"object": "list", "data": [model_card(state, name) for name in names]}

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id, state.limits)
        return model_card(state, model_id)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        _note(request, state, body, body.messages)
        job = chat_job(body, state.limits)
        _require_generative(state)
        return await generate(request, state, job, stream=body.stream, include_usage=include_usage(body), body=body)

    @api.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        _note(request, state, body, body.prompt)
        job = completion_job(body, state.limits)
        _require_generative(state)
        return await generate(request, state, job, stream=body.stream, include_usage=include_usage(body), body=body)

    @api.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingRequest):
        _note(request, state, body, body.input)
        job = embedding_job(body, state.limits)
        if not state.engine.embeddings:
            raise ApiError(
                400,
                f"{state.model.model_id} is a text generation model and does not provide embeddings; "
                "serve an embedding model (BERT-style GGUF) for /v1/embeddings",
                param="model",
                code="embeddings_not_supported",
            )
        return await generate(request, state, job, stream=False, include_usage=False, body=body)


def model_card(state: ServerState, name: str | None = None) -> dict:
    """The served model, under its name or one of its --alias names (`sovpack.name` is always the bundle's)."""
    m, entry = state.model, state.model.choice.entry
    return {
        "id": name if name in state.limits.aliases else m.model_id,
        "object": "model",
        "created": int(m.metadata.created.timestamp()),
        "owned_by": "sovpack",
        "sovpack": {
            "name": m.model_id,
            "version": m.metadata.version,
            "file": entry.path,
            "sha256": entry.sha256,
            "quantization": m.choice.quantization,
            "chat_template_sha256": m.chat_template_sha256,
            "signers": m.signers,
            "expires": format_time(m.metadata.expires) if m.metadata.expires else None,
            "context_length": state.engine.context_size,
        },
    }


def _note(request: Request, state: ServerState, body, prompt) -> None:
    record = request.state.record
    record.model, record.stream = state.limits.model_id, bool(getattr(body, "stream", False))
    if state.log_prompts:
        record.prompt = prompt


def _require_generative(state: ServerState) -> None:
    if state.engine.embeddings:
        raise ApiError(
            400, f"{state.model.model_id} is an embedding model; use /v1/embeddings", param="model", code="model_not_generative"
        )


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        request.state.record.error = exc.code or exc.type
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return await api_error(request, exc.api_error())

    @api.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        request.state.record.outcome = "client_disconnected"
        return Response(status_code=499)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", kind), status_code=exc.status_code, headers=exc.headers
        )

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return ApiError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = _param(first)
    if param is None:
        return ApiError(
            400,
            f"the request body must be a JSON object (send Content-Type: application/json): {first.get('msg')}",
            code="invalid_body",
        )
    # a union (a message can be one of several types) reports once per alternative: say them together
    problems = list(dict.fromkeys(e.get("msg") for e in errors if _param(e) == param))
    found = first.get("input")
    shown = f" (got {found!r})" if isinstance(found, (str, int, float, bool)) else ""
    return ApiError(400, f"invalid value for {param}{shown}: {'; or '.join(problems)}", param=param, code="invalid_value")


def _param(error: dict) -> str | None:
    """The field at fault as a client names it: no "body", no pydantic type names."""
    parts = [str(p) for p in error.get("loc", ()) if p != "body" and not _is_type_name(p)]
    return ".".join(parts) or None


def _is_type_name(part) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in {"str", "int", "float", "bool", "none"})
