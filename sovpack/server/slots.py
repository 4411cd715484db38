"""The bounded FIFO queue in front of the generation slots.

A request takes a free slot at once, or waits in line; requests are served in arrival
order and a running generation is never interrupted for a newer one (llama-cpp-python's
own server cancels a running stream when another request arrives). When `max_queue`
requests are already waiting, a new one is turned away with QueueFull, which the API
answers with 503 and a Retry-After estimated from recent request durations.

Everything here runs on the event loop thread; worker threads hand slots back with
`loop.call_soon_threadsafe(pool.release, slot)`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Generic, TypeVar

S = TypeVar("S")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: all generation slots are in use and {waiting} request(s) are already waiting")
        self.retry_after = retry_after


class SlotPool(Generic[S]):
    def __init__(self, slots: list[S], max_queue: int):
        self.size = len(slots)
        self.max_queue = max_queue
        self._free: list[S] = list(slots)
        self._waiters: deque[asyncio.Future] = deque()
        self._mean_seconds = 5.0  # running estimate of how long a slot stays busy

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        return self.size - len(self._free)

    async def acquire(self) -> S:
        """A free slot; waits in FIFO order; raises QueueFull when the line is full."""
        if self._free and not self._waiters:
            return self._free.pop()
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(len(self._waiters), self.retry_after())
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # got a slot just as the client left: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, slot: S, busy_seconds: float | None = None) -> None:
        if busy_seconds is not None:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * busy_seconds
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def retry_after(self) -> int:
        """Seconds until a place in line is likely to free up (1 to 120)."""
        return max(1, min(120, math.ceil(self._mean_seconds * (len(self._waiters) + 1) / self.size)))
