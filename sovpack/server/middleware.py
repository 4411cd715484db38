"""ASGI layers around the API, outermost first: access record, CORS (optional), API key, body size.

They are plain ASGI callables (no BaseHTTPMiddleware, which buffers streams), and they
answer with OpenAI-style error bodies. The API key is checked before the body is read,
so an unauthenticated client gets 401 whatever it sends.
"""

from __future__ import annotations

from sovpack.server.access_log import RequestRecord
from sovpack.server.errors import ApiError, unauthorized

OPEN_PATHS = {"/health"}  # answered without an API key


async def send_error(send, error: ApiError) -> None:
    body = error.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def record_of(scope) -> RequestRecord:
    """The request's record, created by AccessRecordMiddleware, the outermost layer."""
    return scope["state"]["record"]


class AccessRecordMiddleware:
    """Creates the request's record, notes status and timing, and hands it to the log and metrics."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        record = RequestRecord(scope["method"], scope["path"], client[0] if client else None)
        scope.setdefault("state", {})["record"] = record

        async def noting_send(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            record.status = record.status or 500
            raise
        finally:
            if record.status is None:  # cancelled before answering: client gone or shutdown timeout
                record.status, record.outcome = 499, "cancelled"
            elif record.status >= 400 and record.outcome == "ok":
                record.outcome = "error"
            record.latency_ms = record.since_start_ms()
            if record.path not in OPEN_PATHS:
                self.state.metrics.observe(record)
                self.state.access_log.write(record)


class ApiKeyMiddleware:
    def __init__(self, app, keys):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.keys is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        authorization = _header(scope, b"authorization") or ""
        scheme, _, token = authorization.partition(" ")
        key_id = self.keys.identify(token.strip() if scheme.lower() == "bearer" else None)
        if key_id is None:
            error = unauthorized()
            _note_error(scope, error)
            return await send_error(send, error)
        record_of(scope).key_id = key_id
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body (at most `limit` bytes) before the app sees it; 413 beyond that."""

    DRAIN_FACTOR = 8  # read and discard up to 8x the limit so that the client sees the 413

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send, int(declared))
        body, more, disconnected = bytearray(), True, False
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send, None, already=len(body), more=more)
        await self.app(scope, _replay(bytes(body), receive, disconnected), send)

    async def _too_large(self, scope, receive, send, declared, already=0, more=True):
        received = already
        while more and received <= self.limit * self.DRAIN_FACTOR:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        size = f"{declared} bytes" if declared else f"more than {self.limit} bytes"
        error = ApiError(
            413, f"the request body is {size}; this server accepts at most {self.limit} bytes", code="request_too_large"
        )
        _note_error(scope, error)
        await send_error(send, error)


def _replay(body: bytes, receive, disconnected: bool):
    """A receive() that gives the buffered body once, then waits for the client as usual."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


def _note_error(scope, error: ApiError) -> None:
    record_of(scope).error = error.code
