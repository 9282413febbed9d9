"""One keep-alive connection to a backend: an asyncio protocol whose bytes are parsed by llhttp.

The parsing itself is httptools' (llhttp, the parser of Node.js and uvicorn), which rejects what a
lenient parser would let through: two Content-Length headers, a chunk size such as `0x5` or `-5`,
a space before a header's colon. This module only turns the parser's callbacks into the state of
the answer being read (`reply.Reply`), and owns the idle (read) timeout.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httptools

from .failures import ConnectionBroken, ProtocolError, ReadTimeout, TransportError

if TYPE_CHECKING:
    from .reply import Reply


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; reads one answer at a time into `self.reply`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float, busy: set | None = None) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        # The pool's set of connections waiting on an answer (its watchdog checks their idleness:
        # one timer per pool instead of one per request).
        self.busy: set = busy if busy is not None else set()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reply: Reply | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.paused = False         # reading paused by us (back-pressure): never the backend's fault
        self.close_after = False    # the parser's state is not reusable (after an answer to HEAD)
        self.last_data = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.disarm()
        r = self.reply
        if r is None or r.complete:
            return
        if r.until_close and r.head_done:       # a body delimited by the close has ended
            r.finish()
        else:
            reason = f": {exc}" if exc else ""
            r.fail(ConnectionBroken(f"backend closed the connection before its answer was complete{reason}"))

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        r = self.reply
        if r is None:                            # bytes nobody asked for: the connection is unusable
            self.close()
            return
        if not r.got_bytes:
            r.first_byte()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            r.fail(ProtocolError("backend switched protocols, which the router never asks for"))
            self.close()
        except httptools.HttpParserError as exc:
            r.fail(ProtocolError(f"malformed answer from the backend: {exc}"))
            self.close()
        except TransportError as exc:             # raised by a callback below
            r.fail(exc)
            self.close()

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        r = self.reply
        if r is None or r.complete:
            raise ProtocolError("backend sent data after the end of its answer")
        r.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        r = self.reply
        assert r is not None
        status = self.parser.get_status_code()
        if status < 200:                         # 100 Continue, 103 Early Hints: the real head follows
            r.interim = True
            return
        r.head(status, self.parser.should_keep_alive())
        if r.complete:                           # an answer to HEAD: llhttp would wait for a body
            self.close_after = True

    def on_body(self, body: bytes) -> None:
        self.reply.body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        r = self.reply
        assert r is not None
        if r.interim:
            r.interim = False
            return
        if not self.parser.should_keep_alive():
            r.keep_alive = False
        r.finish()

    # -- flow control and the idle timeout -------------------------------------------------------
    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.last_data = self.loop.time()    # the idle clock restarts when we read again
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def arm(self) -> None:
        """Start the idle clock for one answer: the pool's watchdog looks at busy connections."""
        self.last_data = self.loop.time()
        self.busy.add(self)

    def disarm(self) -> None:
        self.busy.discard(self)

    def check_idle(self, now: float) -> None:
        """Called by the pool's watchdog: fail the answer if the backend has been silent too long."""
        if self.paused:                           # waiting on our own client: not the backend's idleness
            self.last_data = now
            return
        if now - self.last_data >= self.read_timeout:
            if self.reply is not None:
                self.reply.fail(ReadTimeout(f"no data from the backend for {self.read_timeout:g}s"))
            self.close()

    def close(self) -> None:
        self.closed = True
        self.disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


__all__ = ["Connection"]
