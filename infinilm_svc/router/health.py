"""Backend health: active /health checks with thresholds, and a passive circuit breaker."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import random
import time
from typing import Callable

from ..config.router import RouterConfig
from .failures import BackendHung, TransportError
from .pool import Pool
from .table import Backend, Table

log = logging.getLogger(__name__)
_timeout = getattr(asyncio, "timeout", None)


class Health:
    """Combines the active and passive signals into each backend's routability."""

    def __init__(self, config: RouterConfig, table: Table, pool: Pool) -> None:
        self.config = config
        self.table = table
        self.path = config.health_path.encode()
        self.pool = pool
        self.probes: set[asyncio.Task] = set()
        self.running = 0                         # probes in flight
        self.due: list[tuple[float, int, Backend]] = []   # heap of (loop time, tie-break, backend)
        self.seq = itertools.count()
        self.behind = 0.0                        # how late the last scheduled check started (s)
        self.checks = [0, 0]                     # failed, passed

    # -- passive: the circuit breaker (the state is the backend's `Circuit`; the timer is here) ----
    def record_success(self, b: Backend) -> None:
        """A request to `b` got an answer that says nothing against it."""
        if b.circuit.record_outcome(True, time.monotonic()):
            log.info("backend %s: circuit closed after a successful trial", b.name)
            self.table.rebuild()

    def record_failure(self, b: Backend) -> None:
        """A request to `b` failed to connect, timed out or got a 5xx."""
        c = b.circuit
        if c.record_outcome(False, time.monotonic()):
            if b.reopen is not None:
                b.reopen.cancel()
            b.reopen = asyncio.get_running_loop().call_later(c.cooldown, self._half_open, b)
            log.warning("backend %s: circuit open for %gs after %d failure(s)", b.name, c.cooldown, c.failures)
            self.table.rebuild()

    def _half_open(self, b: Backend) -> None:
        b.reopen = None
        if self.table.backends.get(b.name) is b and b.circuit.half_open():
            self.table.rebuild()

    def forget(self, b: Backend) -> None:
        if b.reopen is not None:
            b.reopen.cancel()
            b.reopen = None

    def reset(self, b: Backend) -> None:
        """Forget every verdict about `b` (a new incarnation): closed circuit, fresh active checks."""
        self.forget(b)
        b.circuit.reset()
        b.active_ok = True
        b.fail_streak = 0
        b.ok_streak = 0
        self._schedule(b, min(0.25, self.config.health_interval))

    # -- active: /health with thresholds ----------------------------------------------------
    def track(self, b: Backend) -> None:
        """Schedule the first check of a backend just added at a random point of the interval, so
        a fleet that registers at once is not checked all at once."""
        self._schedule(b, random.uniform(0.0, self.config.health_interval))

    def _schedule(self, b: Backend, delay: float) -> None:
        """(Re)schedule `b`'s next check; an earlier entry for it in the heap becomes stale."""
        b.check_due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self.due, (b.check_due, next(self.seq), b))

    async def run(self) -> None:
        """Check each backend once per `health_interval`, at its own phase, forever.

        The checks are spread over the interval, at most `health_concurrency` run at once and at
        most `health_max_rate` start per second: with more backends than that rate allows per
        interval, each is checked less often (`effective_interval`) instead of the router spending
        its CPU on checks. A failed check is confirmed by another 0.25 s later, and a backend that
        failed its checks is re-checked every second, within the same budget. Out of budget: a
        backend holding requests that have had no byte back for longer than `health_timeout` is
        probed at once, so a hung backend (accepting, never answering) is out of rotation about
        `unhealthy_threshold` probe timeouts after it was first suspected.
        """
        loop = asyncio.get_running_loop()
        for b in self.table.backends.values():
            if not b.check_due:
                self.track(b)
        rate = self.config.health_max_rate
        burst = max(1.0, rate / 10)
        tokens, last, next_scan = burst, loop.time(), 0.0
        try:
            while True:
                now = loop.time()
                tokens = min(burst, tokens + (now - last) * rate)
                last = now
                if now >= next_scan:
                    next_scan = now + 0.25
                    self._probe_suspects(now)
                due = self.due
                while due and due[0][0] <= now and tokens >= 1 and self.running < self.config.health_concurrency:
                    at, _, b = heapq.heappop(due)
                    if at != b.check_due or self.table.backends.get(b.name) is not b:
                        continue   # rescheduled since, or removed
                    self.behind = now - at
                    if b.probing:
                        self._schedule(b, self.config.health_interval)
                        continue
                    if not self.probe_soon(b):
                        self._schedule(b, self.config.health_interval)   # not running: nothing to check
                        continue
                    tokens -= 1
                if due and due[0][0] <= now:
                    wait = (1 - tokens) / rate if tokens < 1 else 0.01   # out of budget or of slots
                else:
                    wait = (due[0][0] - now) if due else 0.25
                await asyncio.sleep(min(max(wait, 0.002), next_scan - now, 0.25))
        finally:
            for task in list(self.probes):
                task.cancel()

    @property
    def effective_interval(self) -> float:
        """How often each backend is checked given the rate budget (seconds)."""
        n = len(self.table.backends)
        return max(self.config.health_interval, n / self.config.health_max_rate)

    def probe_soon(self, b: Backend) -> bool:
        """Start a probe of `b` unless one is running, or the registry says it is not running (it is
        not routable then anyway, and a backend still starting would collect failed checks)."""
        if b.probing or (b.state != "running" and not b.static):
            return False
        b.probing = True
        self.running += 1
        task = asyncio.create_task(self._check(b), name=f"probe-{b.name}")
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)
        return True

    def _probe_suspects(self, now: float) -> None:
        """Out-of-turn probes: a backend holding a request with no byte back for longer than
        health_timeout, or an answer under way that has been silent that long, is checked at once.

        Both are found among the connections waiting on an answer, so an idle router looks at
        nothing; only when one is found are the backends searched for its address. Going through
        every backend four times a second was about a fifth of an idle router's CPU at 10,000
        backends (4.1-4.6% of a core before, 3.4-3.8% after)."""
        limit = self.config.health_timeout
        targets = set()
        for conn in self.pool.busy:
            r = conn.reply
            if r is None:
                continue
            if r.got_bytes:     # an answer under way: silent (not paused for our own client) too long
                if not conn.paused and now - conn.last_data > limit:
                    targets.add(r.key)
            elif now - r.sent_at > limit:    # no byte back yet, for too long
                targets.add(r.key)
        if not targets:
            return
        for b in self.table.backends.values():
            if (b.active_ok and not b.probing and now - b.suspect_probe > limit
                    and self.pool.target(b.url) in targets):
                b.suspect_probe = now
                self.probe_soon(b)

    def _silent_streams(self, now: float):
        """(connection, reply) of the answers under way whose backend has sent nothing for longer
        than health_timeout (not counting time paused for our own slow client)."""
        limit = self.config.health_timeout
        for conn in list(self.pool.busy):
            r = conn.reply
            if r is not None and r.got_bytes and not conn.paused and now - conn.last_data > limit:
                yield conn, r

    async def _check(self, b: Backend) -> None:
        try:
            ok, elapsed = await self._probe(b)
        finally:
            b.probing = False
            self.running -= 1
        self.checks[ok] += 1
        if self.table.backends.get(b.name) is not b:
            return  # removed meanwhile
        self._apply(b, ok, elapsed)
        if ok:
            delay = self.config.health_interval
        elif b.active_ok:
            delay = min(0.25, self.config.health_interval)    # confirm a first failure soon
        else:
            delay = min(1.0, self.config.health_interval)     # back as soon as it answers again
        self._schedule(b, delay)

    def _apply(self, b: Backend, ok: bool, elapsed: float) -> None:
        b.last_check = time.time()
        if ok:
            b.response_time = elapsed
            b.ok_streak += 1
            b.fail_streak = 0
            if not b.active_ok and b.ok_streak >= self.config.healthy_threshold:
                b.active_ok = True
                log.info("backend %s: healthy again (%d good checks)", b.name, b.ok_streak)
                self.table.rebuild()
            return
        b.fail_streak += 1
        b.ok_streak = 0
        if b.active_ok and b.fail_streak >= self.config.unhealthy_threshold:
            b.active_ok = False
            log.warning("backend %s: unhealthy after %d failed checks", b.name, b.fail_streak)
            self.table.rebuild()
            self.redispatch(b, f"backend {b.name} failed {b.fail_streak} health checks")

    def redispatch(self, b: Backend, why: str) -> None:
        """Fail `b`'s requests that have had nothing back yet, so the proxy retries them elsewhere,
        and its answers under way that have gone silent, so they continue elsewhere (request
        migration) instead of waiting for the process to die or for read_timeout."""
        for reply in list(b.pending):
            reply.fail(BackendHung(f"{why} while this request waited for its answer"))
            reply.conn.close()
        b.pending.clear()
        key = self.pool.target(b.url)
        now = asyncio.get_running_loop().time()
        for conn, reply in list(self._silent_streams(now)):
            if reply.key == key:
                reply.fail(BackendHung(f"{why}; its answer had been silent for {now - conn.last_data:.1f}s"))
                conn.close()

    async def _probe(self, b: Backend) -> tuple[bool, float]:
        """GET the health path on a connection of its own, closed once the status line is in: a
        check holds no pooled connection (thousands of backends would hold thousands of sockets)
        and costs a fraction of a client library's request."""
        pool = self.pool
        loop = asyncio.get_running_loop()
        key = pool.target(b.url)
        t0 = time.monotonic()
        got: asyncio.Future[int] = loop.create_future()
        opened: list[asyncio.BaseTransport] = []

        async def ask() -> int:
            transport, _ = await loop.create_connection(lambda: _StatusLine(got), key.host, key.port,
                                                        ssl=pool.ssl_context() if key.tls else None)
            opened.append(transport)
            transport.write(b"".join((b"GET ", key.base_path, self.path, b" HTTP/1.1\r\n", key.host_header,
                                      b"Connection: close\r\n", b.auth_lines, b"\r\n")))
            return await got

        try:
            if _timeout is not None:     # Python 3.11+: no task of its own per check
                async with _timeout(self.config.health_timeout):
                    status = await ask()
            else:
                status = await asyncio.wait_for(ask(), self.config.health_timeout)
            # A backend without a health endpoint (404) is alive; 5xx is not.
            return status < 500, time.monotonic() - t0
        except (OSError, asyncio.TimeoutError, ValueError):
            return False, time.monotonic() - t0
        finally:
            for transport in opened:
                transport.close()


    def read_props(self, b: Backend, done: Callable[[int | None], None]) -> None:
        """Ask `b`'s engine how many slots it has (llama-server's /props `total_slots`), in the
        background; `done` gets the count, or None when the engine does not say."""
        task = asyncio.create_task(self._props(b, done), name=f"props-{b.name}")
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)

    async def _props(self, b: Backend, done: Callable[[int | None], None]) -> None:
        pool = self.pool
        n: int | None = None
        try:
            reply = await asyncio.wait_for(
                pool.request(pool.target(b.url), b"GET", b"/props", b.auth_lines, b""), self.config.health_timeout * 2)
            body = await asyncio.wait_for(reply.read(), self.config.health_timeout * 2)
            if reply.status == 200:
                got = json.loads(body).get("total_slots")
                n = got if isinstance(got, int) and not isinstance(got, bool) and got > 0 else None
        except (TransportError, asyncio.TimeoutError, ValueError, AttributeError):
            n = None
        done(n)


class _StatusLine(asyncio.Protocol):
    """Reads an HTTP answer's status code and nothing more."""

    def __init__(self, got: asyncio.Future[int]) -> None:
        self.got = got
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        if self.got.done():
            return
        self.buf += data
        line, sep, _ = self.buf.partition(b"\r\n")
        if not sep:
            if len(self.buf) > 4096:
                self.got.set_exception(ValueError("no status line in the first 4 KiB"))
            return
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self.got.set_exception(ValueError(f"not an HTTP status line: {line[:80]!r}"))
        else:
            self.got.set_result(int(parts[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.got.done():
            self.got.set_exception(ConnectionResetError("closed before a status line"))
