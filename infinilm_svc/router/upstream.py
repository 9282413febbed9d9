"""A lean HTTP/1.1 keep-alive client for the proxy path: pooled connections, streamed bodies, idle timeouts."""
from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
from urllib.parse import urlsplit

_HIGH_WATER = 1 << 20     # buffered stream bytes before we stop reading from the backend
_LOW_WATER = 1 << 18


class ConnectFailed(Exception):
    """The TCP (or TLS) connection to the backend could not be made."""


class UpstreamTimeout(Exception):
    """The backend sent nothing for longer than the read (idle) timeout."""


class UpstreamBroken(Exception):
    """The backend closed the connection or sent something that is not HTTP."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time (status, headers, body)."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.last_data = 0.0
        self.idle_since = 0.0
        self.head_waiter: asyncio.Future | None = None
        self.body_waiter: asyncio.Future | None = None
        self.error: Exception | None = None
        self._reset()

    def _reset(self) -> None:
        self.state = 0           # 0 head, 1 length body, 2 chunked size, 3 chunked data, 4 trailers, 5 until close, 6 done
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.content_type = ""
        self.keep_alive = True
        self.remaining = 0
        self.streaming = False
        self.parts: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.got_bytes = False

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == 5:          # body delimited by the close
            self.state = 6
            self._wake_body()
            return
        if self.state != 6 or self.head_waiter is not None:
            self._fail(UpstreamBroken(f"backend closed the connection{': ' + str(exc) if exc else ''}"))

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        self.got_bytes = True
        if self.state == 1 and not self.buf:   # fast path: plain body bytes
            n = len(data)
            if n <= self.remaining:
                self._add(data)
                self.remaining -= n
                if not self.remaining:
                    self.state = 6
                self._wake_body()
                return
        elif self.state == 2 and not self.buf:  # fast path: exactly one whole chunk (an SSE event)
            i = data.find(b"\r\n")
            if 0 < i < 10:
                try:
                    size = int(data[:i], 16)
                except ValueError:
                    size = 0
                if size and len(data) == i + size + 4 and data[-2:] == b"\r\n":
                    self._add(data[i + 2:i + 2 + size])
                    self._wake_body()
                    return
        self.buf += data
        try:
            self._parse()
        except (UpstreamBroken, ValueError) as exc:
            self._fail(exc if isinstance(exc, UpstreamBroken) else UpstreamBroken(f"bad response: {exc}"))
            if self.transport is not None:
                self.transport.abort()

    def pause_writing(self) -> None:  # pragma: no cover - requests are small
        pass

    def resume_writing(self) -> None:  # pragma: no cover
        pass

    # -- parsing --------------------------------------------------------------------------
    def _add(self, piece: bytes) -> None:
        self.parts.append(piece)
        self.buffered += len(piece)
        if self.streaming and self.buffered > _HIGH_WATER and not self.paused and self.transport:
            self.paused = True
            self.transport.pause_reading()

    def _parse(self) -> None:
        buf = self.buf
        while True:
            st = self.state
            if st == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise UpstreamBroken("response head too large")
                    return
                self._head(bytes(buf[:end]).decode("latin-1"))
                del buf[:end + 4]
                if self.state == 0:      # an interim 1xx answer: the real head follows
                    continue
                w = self.head_waiter
                self.head_waiter = None
                if w is not None and not w.done():
                    w.set_result(None)
            elif st == 1:
                if not buf:
                    return
                take = bytes(buf[:self.remaining])
                del buf[:len(take)]
                self._add(take)
                self.remaining -= len(take)
                if not self.remaining:
                    self.state = 6
                self._wake_body()
            elif st == 2:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[:end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise UpstreamBroken(f"bad chunk size {line[:20]!r}") from None
                if size:
                    self.remaining = size
                    self.state = 3
                else:
                    self.state = 4
            elif st == 3:
                rem = self.remaining
                if rem:
                    if len(buf) <= rem:          # part (or all) of the chunk's data: hand it on now
                        if buf:
                            piece = bytes(buf)
                            buf.clear()
                            self.remaining = rem - len(piece)
                            self._add(piece)
                            self._wake_body()
                        return
                    self._add(bytes(buf[:rem]))
                    del buf[:rem]
                    self.remaining = 0
                    self._wake_body()
                if len(buf) < 2:                 # the CRLF that ends the chunk
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamBroken("chunk not followed by CRLF")
                del buf[:2]
                self.state = 2
            elif st == 4:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self.state = 6
                    self._wake_body()
            elif st == 5:
                if buf:
                    self._add(bytes(buf))
                    buf.clear()
                    self._wake_body()
                return
            else:
                if buf:
                    raise UpstreamBroken("data after the end of the response")
                return

    def _head(self, text: str) -> None:
        lines = text.split("\r\n")
        first = lines[0]
        if not first.startswith("HTTP/1."):
            raise UpstreamBroken(f"not an HTTP response: {first[:40]!r}")
        try:
            self.status = int(first[9:12])
        except ValueError:
            raise UpstreamBroken(f"bad status line {first[:40]!r}") from None
        if 100 <= self.status < 200:     # 100 Continue, 103 Early Hints: skipped (we never ask to upgrade)
            return
        headers = self.headers
        length = None
        chunked = False
        self.keep_alive = first[5:8] == "1.1"
        for line in lines[1:]:
            k, _, v = line.partition(":")
            v = v.strip()
            lk = k.lower()
            if lk == "content-length":
                length = int(v)
            elif lk == "transfer-encoding":
                chunked = "chunked" in v.lower()
            elif lk == "connection":
                lv = v.lower()
                if "close" in lv:
                    self.keep_alive = False
                elif "keep-alive" in lv:
                    self.keep_alive = True
            elif lk == "content-type":
                self.content_type = v
            headers.append((k, v))
        self.streaming = "text/event-stream" in self.content_type
        if self.status in (204, 304) or self.method_head:
            self.state = 6
        elif chunked:
            self.state = 2
        elif length is not None:
            self.remaining = length
            self.state = 1 if length else 6
        else:
            self.state = 5
            self.keep_alive = False

    def _wake_body(self) -> None:
        w = self.body_waiter
        if w is not None:
            self.body_waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        for name in ("head_waiter", "body_waiter"):
            w = getattr(self, name)
            if w is not None:
                setattr(self, name, None)
                if not w.done():
                    w.set_exception(exc)

    # -- used by Response ------------------------------------------------------------------
    method_head = False

    def close(self) -> None:
        self.closed = True
        self.disarm()
        if self.transport is not None:
            self.transport.abort()

    # -- the idle (read) timeout: one watchdog per request, not one timer per read -----------
    watchdog: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.last_data = self.loop.time()
        self.watchdog = self.loop.call_later(self.pool.read_timeout, self._watch)

    def disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None

    def _watch(self) -> None:
        self.watchdog = None
        timeout = self.pool.read_timeout
        idle = self.loop.time() - self.last_data
        if idle >= timeout:
            self._fail(UpstreamTimeout(f"no data from the backend for {timeout:g}s"))
            self.close()
        else:
            self.watchdog = self.loop.call_later(timeout - idle, self._watch)


class Response:
    """A backend's answer: status and headers at once; the body whole (read) or piece by piece (stream)."""

    __slots__ = ("conn", "status", "headers", "content_type", "streaming", "done", "pool", "key")

    def __init__(self, conn: _Conn, pool: "Pool", key: tuple) -> None:
        self.conn = conn
        self.pool = pool
        self.key = key
        self.status = conn.status
        self.headers = conn.headers
        self.content_type = conn.content_type
        self.streaming = conn.streaming
        self.done = False

    async def _wait(self) -> None:
        c = self.conn
        if c.error is not None:
            raise c.error
        fut = c.loop.create_future()
        c.body_waiter = fut
        await fut

    async def read(self) -> bytes:
        """The whole body (for answers that are not streams)."""
        c = self.conn
        while c.state != 6:
            await self._wait()
        body = b"".join(c.parts) if len(c.parts) != 1 else c.parts[0]
        c.parts.clear()
        self.release()
        return body

    async def readany(self) -> bytes:
        """The next piece of a streamed body, or b"" at its end."""
        c = self.conn
        while not c.parts:
            if c.state == 6:
                self.release()
                return b""
            await self._wait()
        if len(c.parts) == 1:
            piece = c.parts.popleft()
        else:
            piece = b"".join(c.parts)
            c.parts.clear()
        c.buffered = 0
        if c.paused and c.transport is not None:
            c.paused = False
            c.transport.resume_reading()
        return piece

    def release(self) -> None:
        """Give the connection back to the pool if the answer was read to its end, else close it."""
        if self.done:
            return
        self.done = True
        c = self.conn
        if c.state == 6 and c.keep_alive and not c.closed and not c.buf:
            self.pool._put(self.key, c)
        else:
            c.close()

    def close(self) -> None:
        """Drop the connection (the backend sees the client go away)."""
        if not self.done:
            self.done = True
            self.conn.close()


class Pool:
    """Idle keep-alive connections per backend address; one per request in flight."""

    def __init__(self, connect_timeout: float, read_timeout: float, keepalive: float = 30.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.idle: dict[tuple, list[_Conn]] = {}
        self.targets: dict[str, tuple] = {}
        self._ssl: ssl_module.SSLContext | None = None

    def target(self, url: str) -> tuple:
        """(host, port, tls, Host header) of a backend URL (cached)."""
        t = self.targets.get(url)
        if t is None:
            u = urlsplit(url)
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            t = self.targets[url] = (u.hostname or "127.0.0.1", port, tls, u.netloc, u.path.rstrip("/"))
        return t

    def _put(self, key: tuple, c: _Conn) -> None:
        c.disarm()
        c._reset()
        c.reused = True
        c.idle_since = self.loop.time()
        self.idle.setdefault(key, []).append(c)

    async def _connect(self, key: tuple) -> _Conn:
        host, port, tls = key[0], key[1], key[2]
        ssl_ctx = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl_module.create_default_context()
            ssl_ctx = self._ssl
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), host, port, ssl=ssl_ctx), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connect to {host}:{port} timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn

    async def request(self, url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        """Send one request and wait for the answer's status and headers (and the body, unless a stream)."""
        key = self.target(url)
        head = f"{method} {key[4]}{path} HTTP/1.1\r\nHost: {key[3]}\r\nContent-Length: {len(body)}\r\n"
        head += "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) + "\r\n"
        data = head.encode("latin-1") + body if body else head.encode("latin-1")
        idle = self.idle.get(key)
        now = self.loop.time()
        for attempt in (0, 1):
            c = None
            while idle:
                cand = idle.pop()
                if not cand.closed and now - cand.idle_since < self.keepalive:
                    c = cand
                    break
                cand.close()
            if c is None:
                c = await self._connect(key)
            c.method_head = method == "HEAD"
            fut = self.loop.create_future()
            c.head_waiter = fut
            assert c.transport is not None
            c.transport.write(data)
            c.arm()
            try:
                await fut
            except UpstreamBroken:
                # A reused keep-alive connection the backend had already closed: try a fresh one once.
                if c.reused and not c.got_bytes and attempt == 0:
                    c.close()
                    idle = None
                    continue
                c.close()
                raise
            except BaseException:
                c.close()
                raise
            return Response(c, self, key)
        raise UpstreamBroken("unreachable")  # pragma: no cover

    def close(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()


__all__ = ["Pool", "Response", "ConnectFailed", "UpstreamTimeout", "UpstreamBroken"]
