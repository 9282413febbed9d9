"""How many requests a backend runs at once through this router, and who waits for a place.

Every path to a backend goes through its `Admission`: a new request, a retry and a migration
alike, so `max_in_flight` holds whatever path a request took. The count is the backend's
`in_flight` statistic (one count, read by the policies and the metrics); with no limit, entering
never waits.
"""
from __future__ import annotations

import asyncio
from collections import deque

from .stats import Counters


class QueueFull(Exception):
    """The backend is at its limit and its queue holds as many as it may."""


class QueueTimeout(Exception):
    """The backend stayed at its limit for longer than the caller would wait."""


class Admission:
    """One backend's limit on requests in flight, and its bounded queue."""

    __slots__ = ("counters", "limit", "queue_size", "waiters")

    def __init__(self, counters: Counters, limit: int = 0, queue_size: int = 100) -> None:
        self.counters = counters
        self.limit = limit               # 0: no limit
        self.queue_size = queue_size
        self.waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        """Take a place if one is free (always, without a limit)."""
        c = self.counters
        if self.limit and (c.in_flight >= self.limit or self.waiters):
            return False
        c.in_flight += 1
        return True

    async def enter(self, timeout: float) -> None:
        """Take a place, waiting in the queue for at most `timeout` seconds."""
        if self.try_enter():
            return
        if len(self.waiters) >= self.queue_size:
            raise QueueFull()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise QueueTimeout() from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.leave()            # a place was handed over as the waiter was cancelled
            raise
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)

    def leave(self) -> None:
        """Give a place back: straight to the first waiter still waiting, if any."""
        c = self.counters
        c.in_flight -= 1
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                c.in_flight += 1
                fut.set_result(None)
                break


__all__ = ["Admission", "QueueFull", "QueueTimeout"]
