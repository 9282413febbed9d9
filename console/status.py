"""The header bar every screen shows: registry, connection state, refresh interval, staleness."""
from __future__ import annotations

import time
from dataclasses import dataclass

from textual.widgets import Static


@dataclass(frozen=True)
class Status:
    """The poller's state, as the header shows it."""

    registry: str
    connected: bool | None = None      # None: no answer yet
    error: str = ""
    failures: int = 0
    retry_in: float = 0.0
    interval: float = 2.0
    paused: bool = False
    stale_for: float | None = None     # seconds since the last good data, when stale
    retry_at: float | None = None      # monotonic time of the next attempt, while unreachable
    last_ok_at: float | None = None    # monotonic time of the last good data
    services: int = 0
    routers: int = 0
    router_errors: int = 0

    def line(self, now: float | None = None) -> str:
        """The header text (Textual markup); countdowns are computed at `now` (monotonic)."""
        now = time.monotonic() if now is None else now
        parts = [f"[b]infinilm-svc[/b]  registry [b]{self.registry}[/b]"]
        if self.connected is None:
            parts.append("connecting…")
        elif self.connected:
            parts.append("[b]● connected[/b]")
        else:
            retry = self.retry_in if self.retry_at is None else max(0.0, self.retry_at - now)
            msg = f"[b]✖ unreachable[/b] ({self.failures} failed, retrying in {retry:.0f}s, R: now)"
            stale = self.stale_for if self.last_ok_at is None else now - self.last_ok_at
            if stale is not None and self.stale_for is not None:
                msg += f" · [b]STALE[/b] data from {stale:.0f}s ago"
            parts.append(msg)
        parts.append(f"{self.services} services · {self.routers} router{'' if self.routers == 1 else 's'}")
        if self.router_errors:
            parts.append(f"{self.router_errors} router(s) not answering")
        parts.append("[b]PAUSED[/b]" if self.paused else f"every {self.interval:g}s")
        return "  ·  ".join(parts)


class StatusBar(Static):
    """Shows the app's Status; coloured by connection state through CSS classes."""

    def on_mount(self) -> None:
        self.watch(self.app, "status", self._show, init=True)
        # While unreachable, the retry countdown and the age of the stale data tick every second.
        self.set_interval(1.0, lambda: self._show(self.app.status) if self.app.status.connected is False else None)  # type: ignore[attr-defined]

    def _show(self, status: Status) -> None:
        self.update(status.line(self.app.clock()))  # type: ignore[attr-defined]
        self.set_class(status.connected is False, "-error")
        self.set_class(bool(status.connected) and not status.router_errors, "-ok")
        self.set_class(bool(status.connected) and bool(status.router_errors), "-degraded")
        self.set_class(status.paused, "-paused")
