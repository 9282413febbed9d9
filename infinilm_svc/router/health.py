"""Backend health: active /health checks with thresholds, and a passive circuit breaker."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from ..config.router import RouterConfig
from .failures import BackendHung
from .table import CLOSED, HALF_OPEN, OPEN, Backend, Table

log = logging.getLogger(__name__)


class Health:
    """Combines the active and passive signals into each backend's routability."""

    def __init__(self, config: RouterConfig, table: Table) -> None:
        self.config = config
        self.table = table
        self.timeout = aiohttp.ClientTimeout(total=config.health_timeout)
        self.session: aiohttp.ClientSession | None = None
        self.probes: set[asyncio.Task] = set()
        self.limit = asyncio.Semaphore(64)      # probes in flight at once

    # -- passive: the circuit breaker -------------------------------------------------------
    def record_success(self, b: Backend) -> None:
        """A request to `b` got an answer below 500."""
        b.circuit_failures = 0
        if b.circuit != CLOSED:
            b.trial = False
            b.circuit = CLOSED
            log.info("backend %s: circuit closed after a successful trial", b.name)
            self.table.rebuild()

    def record_failure(self, b: Backend) -> None:
        """A request to `b` failed to connect, timed out or got a 5xx."""
        b.circuit_failures += 1
        if b.circuit == HALF_OPEN or (b.circuit == CLOSED and b.circuit_failures >= self.config.eject_after_failures):
            self._open(b)

    def trial_started(self, b: Backend) -> None:
        if b.circuit == HALF_OPEN:
            b.trial = True

    def trial_abandoned(self, b: Backend) -> None:
        """The trial ended without a verdict (client went away): allow another trial."""
        if b.circuit == HALF_OPEN:
            b.trial = False

    def _open(self, b: Backend) -> None:
        b.circuit = OPEN
        b.trial = False
        b.reopen_at = time.monotonic() + self.config.eject_cooldown
        if b.reopen is not None:
            b.reopen.cancel()
        b.reopen = asyncio.get_running_loop().call_later(self.config.eject_cooldown, self._half_open, b)
        log.warning("backend %s: circuit open for %gs after %d failure(s)", b.name,
                    self.config.eject_cooldown, b.circuit_failures)
        self.table.rebuild()

    def _half_open(self, b: Backend) -> None:
        b.reopen = None
        if b.circuit == OPEN and self.table.backends.get(b.name) is b:
            b.circuit = HALF_OPEN
            self.table.rebuild()

    def forget(self, b: Backend) -> None:
        if b.reopen is not None:
            b.reopen.cancel()
            b.reopen = None

    def reset(self, b: Backend) -> None:
        """Forget every verdict about `b` (a new incarnation): closed circuit, fresh active checks."""
        self.forget(b)
        b.circuit = CLOSED
        b.circuit_failures = 0
        b.trial = False
        b.active_ok = True
        b.fail_streak = 0
        b.ok_streak = 0

    # -- active: /health with thresholds ----------------------------------------------------
    async def run(self, session: aiohttp.ClientSession) -> None:
        """Check every backend each `health_interval`, and sooner where a hang is suspected, forever.

        Each backend's probe is applied as soon as it is answered (one hung backend never holds up
        the verdict on the others). A failed probe is confirmed by another 0.25 s later rather than
        a whole interval later, and a backend holding requests that have had no byte back for
        longer than `health_timeout` is probed at once: a hung backend (accepting, never answering)
        is out of rotation about `unhealthy_threshold` probe timeouts after it was first suspected.
        """
        self.session = session
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        tick = min(0.25, self.config.health_interval)
        try:
            while True:
                now = loop.time()
                if now >= next_pass:
                    next_pass = now + self.config.health_interval
                    for b in list(self.table.backends.values()):
                        self.probe_soon(b)
                else:
                    self._probe_suspects(now)
                await asyncio.sleep(min(tick, max(0.0, next_pass - now)) or tick)
        finally:
            for task in list(self.probes):
                task.cancel()

    def probe_soon(self, b: Backend) -> None:
        """Start a probe of `b` unless one is running, or the registry says it is not running (it is
        not routable then anyway, and a backend still starting would collect failed checks)."""
        if b.probing or self.session is None or (b.state != "running" and not b.static):
            return
        b.probing = True
        task = asyncio.create_task(self._check(b), name=f"probe-{b.name}")
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)

    def _probe_suspects(self, now: float) -> None:
        """Out-of-turn probes: a backend that failed its checks is re-checked every second (it comes
        back as soon as it answers again, not an interval later), and one holding requests with no
        byte back for longer than health_timeout is checked at once."""
        limit = self.config.health_timeout
        for b in self.table.backends.values():
            if not b.active_ok and not b.probing and now - b.suspect_probe > min(1.0, self.config.health_interval):
                b.suspect_probe = now
                self.probe_soon(b)
            elif b.pending and b.active_ok and not b.probing and now - b.suspect_probe > limit:
                oldest = min(r.sent_at for r in b.pending)
                if now - oldest > limit:
                    b.suspect_probe = now
                    self.probe_soon(b)

    async def _check(self, b: Backend) -> None:
        try:
            async with self.limit:
                ok, elapsed = await self._probe(b)
        finally:
            b.probing = False
        if self.table.backends.get(b.name) is not b:
            return  # removed meanwhile
        self._apply(b, ok, elapsed)
        if not ok and b.active_ok:
            await asyncio.sleep(min(0.25, self.config.health_interval))
            self.probe_soon(b)

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

    @staticmethod
    def redispatch(b: Backend, why: str) -> None:
        """Fail `b`'s requests that have had nothing back yet, so the proxy retries them elsewhere."""
        for reply in list(b.pending):
            reply.fail(BackendHung(f"{why} while this request waited for its answer"))
            reply.conn.close()
        b.pending.clear()

    async def _probe(self, b: Backend) -> tuple[bool, float]:
        assert self.session is not None
        t0 = time.monotonic()
        try:
            async with self.session.get(b.url + self.config.health_path, timeout=self.timeout,
                                        headers=b.auth_headers) as resp:
                await resp.read()
                # A backend without a health endpoint (404) is alive; 5xx is not.
                return resp.status < 500, time.monotonic() - t0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False, time.monotonic() - t0
