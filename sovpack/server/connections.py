"""Connections that cannot starve anyone: timeouts for slow or silent clients, and a bound on unauthenticated ones.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`,
serve's --idle-timeout), but nothing else: a client that connects and sends nothing, or half
a request head, or half a body, holds its connection for ever, and uvicorn's
`limit_concurrency` counts such connections, so a few dozen of them turned every new client
away, /health included. This h11 protocol adds, per connection:

- a head timeout (--header-timeout): the request head must be complete that many seconds
  after the connection opened or the previous response ended; else the connection closes;
- a body timeout (--body-timeout): the body must be complete that many seconds after its
  head; else the connection closes (the request sees the client as gone);
- a bound on pending connections (--max-pending-connections): a connection is pending until
  it has sent a complete request head with a valid API key (without API keys, any complete
  head). When a new connection would exceed the bound, the oldest pending connection is
  closed, idle ones first: a flood of silent connections displaces itself, not the clients
  that authenticate.

The API key itself is still checked by ApiKeyMiddleware for every request; here it only
tells which connections have proven themselves.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sovpack.server.security import ApiKeys


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds for a request head
    body_timeout: float  # seconds for a request body, from its head
    max_pending: int  # connections without an authenticated request head
    keys: ApiKeys | None


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """An H11Protocol class for uvicorn's `http=` setting that enforces `limits`."""
    pending: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # oldest first, shared by every connection

    class Guarded(GuardedH11Protocol):
        pass

    Guarded.limits, Guarded.pending = limits, pending
    return Guarded


class GuardedH11Protocol(H11Protocol):
    limits: ConnectionLimits
    pending: OrderedDict

    _timer: asyncio.TimerHandle | None = None
    _awaiting: str | None = None  # "head" or "body": what the running timer waits for

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.pending[self] = None
        self._evict_if_over_bound()
        self._wait_for("head", self.limits.header_timeout)

    def connection_lost(self, exc) -> None:
        self.pending.pop(self, None)
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for("head", self.limits.header_timeout)  # beside uvicorn's idle (keep-alive) timer
        self._follow_request()

    def _follow_request(self) -> None:
        """Move the timer along as the client's request progresses: head, then body, then nothing."""
        state = self.conn.their_state
        if self._awaiting == "head" and state is not h11.IDLE:
            self._stop_timer()
            self._head_received()
            if state is h11.SEND_BODY:
                self._wait_for("body", self.limits.body_timeout)
        elif self._awaiting == "body" and state is not h11.SEND_BODY:
            self._stop_timer()

    def _head_received(self) -> None:
        if self in self.pending and self._authenticated():
            del self.pending[self]

    def _authenticated(self) -> bool:
        keys = self.limits.keys
        if keys is None:
            return True
        for name, value in self.headers or ():
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and keys.identify(token.strip()) is not None
        return False

    def _wait_for(self, what: str, seconds: float) -> None:
        self._stop_timer()
        self._awaiting = what
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._awaiting = None, None

    def _timed_out(self) -> None:
        self._timer, self._awaiting = None, None
        self.transport.close()

    def _evict_if_over_bound(self) -> None:
        while len(self.pending) > self.limits.max_pending:
            idle = [c for c in self.pending if c is not self and (c.cycle is None or c.cycle.response_complete)]
            oldest = idle[0] if idle else next(iter(self.pending))
            del self.pending[oldest]
            oldest.transport.close()
