"""Keep-alive connections to backends, per address, and sending one request on one of them."""
from __future__ import annotations

import asyncio
import ssl as ssl_module
from typing import NamedTuple
from urllib.parse import urlsplit

from .connection import Connection
from .failures import ConnectError, ConnectionBroken
from .reply import Reply


class Target(NamedTuple):
    """Where a backend URL points, with the request-line pieces computed once."""

    host: str
    port: int
    tls: bool
    host_header: bytes    # b"Host: ...\r\n"
    base_path: bytes      # the URL's path prefix, without a trailing slash


class Pool:
    """Idle keep-alive connections per backend address; one connection per request in flight."""

    def __init__(self, connect_timeout: float, read_timeout: float, keepalive: float = 30.0,
                 max_idle: int = 32) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.max_idle = max_idle
        self.idle: dict[Target, list[Connection]] = {}
        self.targets: dict[str, Target] = {}
        self._ssl: ssl_module.SSLContext | None = None
        self._reaper: asyncio.TimerHandle | None = None
        self.busy: set[Connection] = set()        # connections waiting on an answer
        self._watchdog: asyncio.TimerHandle | None = None
        self.tick = min(1.0, read_timeout / 4)    # how often the idle (read) timeout is checked

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop: a pool is built with its app, before any loop runs it."""
        return asyncio.get_running_loop()

    def _watch(self) -> None:
        """The idle watchdog of every busy connection (runs while any connection is busy)."""
        self._watchdog = None
        now = self.loop.time()
        for conn in list(self.busy):
            conn.check_idle(now)
        if self.busy:
            self._watchdog = self.loop.call_later(self.tick, self._watch)

    def target(self, url: str) -> Target:
        """The Target of a backend URL (cached: computed once per URL)."""
        t = self.targets.get(url)
        if t is None:
            u = urlsplit(url)
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            t = self.targets[url] = Target(u.hostname or "127.0.0.1", port, tls,
                                           b"Host: " + u.netloc.encode("idna") + b"\r\n",
                                           u.path.rstrip("/").encode())
        return t

    def put(self, key: Target, conn: Connection) -> None:
        """Keep a connection whose answer was read to its end for the next request."""
        conn.disarm()
        idle = self.idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.reused = True
        conn.idle_since = self.loop.time()
        idle.append(conn)
        if self._reaper is None:
            self._reaper = self.loop.call_later(self.keepalive / 2, self._reap)

    def _reap(self) -> None:
        """Close connections idle for longer than `keepalive` (runs while any are idle)."""
        self._reaper = None
        horizon = self.loop.time() - self.keepalive
        for key in list(self.idle):
            conns = self.idle[key]
            keep = [c for c in conns if not c.closed and c.idle_since > horizon]
            for c in conns:
                if c not in keep:
                    c.close()
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        if self.idle:
            self._reaper = self.loop.call_later(self.keepalive / 2, self._reap)

    def ssl_context(self) -> ssl_module.SSLContext:
        """The TLS context for https backends (made once, on first use)."""
        if self._ssl is None:
            self._ssl = ssl_module.create_default_context()
        return self._ssl

    async def _connect(self, key: Target) -> Connection:
        ssl_ctx = self.ssl_context() if key.tls else None
        loop = self.loop
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(loop, self.read_timeout, self.busy), key.host, key.port,
                                       ssl=ssl_ctx),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"connect to {key.host}:{key.port} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {key.host}:{key.port}: {exc.strerror or exc}") from None
        return conn

    async def request(self, key: Target, method: bytes, path: bytes, headers: bytes, body: bytes,
                      pending: set | None = None) -> Reply:
        """Send one request; return once the answer's status and headers are in.

        `headers` are whole header lines (b"Name: value\\r\\n"), forwarded as the client's bytes.
        `pending` is the backend's set of answers awaiting their first byte (see Reply).
        The request goes out in one write. When a reused keep-alive connection turns out to have
        been closed by the backend before it sent anything back, the request is sent again, once,
        on a fresh connection (never after any byte of an answer).
        """
        data = b"".join((method, b" ", key.base_path, path, b" HTTP/1.1\r\n", key.host_header,
                         b"Content-Length: %d\r\n" % len(body), headers, b"\r\n", body))
        head_only = method == b"HEAD"
        idle = self.idle.get(key)
        now = self.loop.time()
        for attempt in (0, 1):
            conn = None
            while idle:
                cand = idle.pop()
                if (not cand.closed and now - cand.idle_since < self.keepalive and cand.transport is not None
                        and not cand.transport.is_closing()):
                    conn = cand
                    break
                cand.close()
            if conn is None:
                conn = await self._connect(key)
            reply = Reply(conn, self, key, head_only, pending)
            conn.reply = reply
            try:
                assert conn.transport is not None
                try:
                    conn.transport.write(data)
                except (RuntimeError, OSError) as exc:   # closed under us (uvloop raises, asyncio ignores)
                    raise ConnectionBroken(f"connection closed before the request was sent: {exc}") from None
                conn.arm()
                if self._watchdog is None:
                    self._watchdog = self.loop.call_later(self.tick, self._watch)
                await reply.wait_head()
            except ConnectionBroken:
                if conn.reused and not reply.got_bytes and attempt == 0:
                    reply.close()
                    idle = None
                    continue
                reply.close()
                raise
            except BaseException:
                reply.close()
                raise
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()


__all__ = ["Pool", "Target"]
