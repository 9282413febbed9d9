"""The header bar every screen shows: registry, connection state, refresh interval, staleness."""
from __future__ import annotations

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
    services: int = 0
    routers: int = 0
    router_errors: int = 0

    def line(self) -> str:
        """The header text (Textual markup)."""
        parts = [f"[b]infinilm-svc[/b]  registry [b]{self.registry}[/b]"]
        if self.connected is None:
            parts.append("connecting…")
        elif self.connected:
            parts.append("[b]● connected[/b]")
        else:
            msg = f"[b]✖ unreachable[/b] ({self.failures} failed, retrying in {self.retry_in:.0f}s)"
            if self.stale_for is not None:
                msg += f" · [b]STALE[/b] data from {self.stale_for:.0f}s ago"
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

    def _show(self, status: Status) -> None:
        self.update(status.line())
        self.set_class(status.connected is False, "-error")
        self.set_class(bool(status.connected) and not status.router_errors, "-ok")
        self.set_class(bool(status.connected) and bool(status.router_errors), "-degraded")
        self.set_class(status.paused, "-paused")
