"""A backend's answer as the proxy sees it: status and headers first, then the body whole or relayed."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Awaitable, Callable

from .failures import TransportError

if TYPE_CHECKING:
    from .connection import Connection
    from .pool import Pool, Target

_HIGH_WATER = 1 << 20     # stream bytes buffered before a relay is attached: then reading pauses

# A relay target: takes one piece of the body; returns True when the client's buffer is full (or
# the client has gone), which pauses reading from the backend until `drain` has been awaited.
Sink = Callable[[bytes], bool]


class Reply:
    """One answer on one connection; the connection's parser callbacks fill it in."""

    __slots__ = ("conn", "pool", "key", "status", "headers", "content_type", "streaming", "keep_alive",
                 "until_close", "head_done", "complete", "interim", "error", "parts", "buffered",
                 "waiter", "sink", "blocked", "got_bytes", "head_only", "released", "pending", "sent_at")

    def __init__(self, conn: "Connection", pool: "Pool", key: "Target", head_only: bool,
                 pending: set | None = None) -> None:
        self.conn = conn
        self.pool = pool
        self.key = key
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.streaming = False
        self.keep_alive = True
        self.until_close = False
        self.head_done = False
        self.complete = False
        self.interim = False
        self.error: TransportError | None = None
        self.parts: deque[bytes] = deque()
        self.buffered = 0
        self.waiter: asyncio.Future | None = None
        self.sink: Sink | None = None
        self.blocked = False
        self.got_bytes = False
        self.head_only = head_only
        self.released = False
        # The backend's set of answers still waiting for their first byte (its health checker
        # re-dispatches them if the backend is found hung); this reply is in it until then.
        self.pending = pending
        self.sent_at = conn.loop.time()
        if pending is not None:
            pending.add(self)

    def first_byte(self) -> None:
        self.got_bytes = True
        if self.pending is not None:
            self.pending.discard(self)

    # -- filled in by the connection -------------------------------------------------------------
    def head(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        framed = False
        for name, value in self.headers:
            n = name.lower()
            if n == b"content-type":
                self.content_type = value
            elif n == b"content-length" or n == b"transfer-encoding":
                framed = True
        self.streaming = b"text/event-stream" in self.content_type
        self.head_done = True
        if self.head_only:
            self.complete = True
            self.keep_alive = False
        elif not framed and status not in (204, 304):
            self.until_close = True
            self.keep_alive = False
        self._wake()

    def body(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            if sink(data):
                self.blocked = True
                self.conn.pause()
                self._wake()
            return
        self.parts.append(data)
        if self.streaming:
            self.buffered += len(data)
            if self.buffered > _HIGH_WATER:
                self.conn.pause()

    def finish(self) -> None:
        self.complete = True
        self.conn.disarm()
        self._wake()

    def fail(self, exc: TransportError) -> None:
        if self.error is None and not self.complete:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    async def _wait(self) -> None:
        fut = self.conn.loop.create_future()
        self.waiter = fut
        await fut

    # -- used by the pool and the proxy ----------------------------------------------------------
    async def wait_head(self) -> None:
        while not self.head_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body (for answers that are not streams)."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.release()
        return body

    async def relay(self, sink: Sink, drain: Callable[[], Awaitable[None]]) -> None:
        """Hand every piece of the body to `sink` as it arrives, until the answer is complete.

        Pieces go from the connection's parser straight to the sink, with no task switch per
        piece; this coroutine wakes only at the end, on an error, or to `drain` a full client.
        """
        parts = self.parts
        while parts:
            if sink(parts.popleft()):
                await drain()
        self.buffered = 0
        self.sink = sink
        conn = self.conn
        conn.resume()
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait()
            if self.blocked:
                await drain()
                self.blocked = False
                conn.resume()
        if self.error is not None:
            raise self.error
        self.release()

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read to its end, else close it."""
        if self.released:
            return
        self.released = True
        if self.pending is not None:
            self.pending.discard(self)
        conn = self.conn
        conn.reply = None
        if self.complete and self.keep_alive and not conn.closed and not conn.close_after:
            self.pool.put(self.key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the backend sees the client go away)."""
        if self.pending is not None:
            self.pending.discard(self)
        if not self.released:
            self.released = True
            self.conn.reply = None
            self.conn.close()


__all__ = ["Reply", "Sink"]
