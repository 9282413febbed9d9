"""Backend health: active /health checks with thresholds, and a passive circuit breaker."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from ..config.router import RouterConfig
from .table import CLOSED, HALF_OPEN, OPEN, Backend, Table

log = logging.getLogger(__name__)


class Health:
    """Combines the active and passive signals into each backend's routability."""

    def __init__(self, config: RouterConfig, table: Table) -> None:
        self.config = config
        self.table = table
        self.timeout = aiohttp.ClientTimeout(total=config.health_timeout)

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
        b.opened_at = time.monotonic()
        b.reopen_at = b.opened_at + self.config.eject_cooldown
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
    async def check_once(self, session: aiohttp.ClientSession) -> None:
        backends = list(self.table.backends.values())
        if not backends:
            return
        results = await asyncio.gather(*(self._probe(session, b) for b in backends))
        changed = False
        now = time.time()
        for b, (ok, elapsed) in zip(backends, results):
            b.last_check = now
            if ok:
                b.response_time = elapsed
                b.ok_streak += 1
                b.fail_streak = 0
                if not b.active_ok and b.ok_streak >= self.config.healthy_threshold:
                    b.active_ok = True
                    changed = True
                    log.info("backend %s: healthy again (%d good checks)", b.name, b.ok_streak)
            else:
                b.fail_streak += 1
                b.ok_streak = 0
                if b.active_ok and b.fail_streak >= self.config.unhealthy_threshold:
                    b.active_ok = False
                    changed = True
                    log.warning("backend %s: unhealthy after %d failed checks", b.name, b.fail_streak)
        if changed:
            self.table.rebuild()

    async def _probe(self, session: aiohttp.ClientSession, b: Backend) -> tuple[bool, float]:
        t0 = time.monotonic()
        try:
            async with session.get(b.url + self.config.health_path, timeout=self.timeout,
                                   headers=b.auth_headers) as resp:
                await resp.read()
                # A backend without a health endpoint (404) is alive; 5xx is not.
                return resp.status < 500, time.monotonic() - t0
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False, time.monotonic() - t0

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Check every backend each `health_interval`, forever (cancelled on shutdown)."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.check_once(session)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("health check pass failed")
