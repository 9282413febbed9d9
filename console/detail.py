"""The backend detail view: its state, statistics over time and its live log, followed across restarts."""
from __future__ import annotations

import asyncio

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, Sparkline, Static

from infinilm_svc.client.babysitter import LogLine

from .cells import fmt_age, fmt_int, fmt_ms, fmt_rate, log_text, route_text, state_text
from .logview import LogView
from .rows import ServiceRow, Snapshot
from .status import StatusBar

RECONNECT_MAX = 10.0


class DetailScreen(Screen):
    """One backend: what the registry and routers say, sparklines, and the babysitter's log stream."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "act('restart')", "Restart"),
        Binding("x", "act('stop')", "Stop"),
        Binding("t", "act('start')", "Start"),
        Binding("c", "clear_log", "Clear log"),
    ]

    def __init__(self, name: str, babysitter_url: str | None) -> None:
        super().__init__(id="detail-screen")
        self.backend_name = name
        self.babysitter_url = babysitter_url
        self.row: ServiceRow | None = None
        self._last_ts = 0.0

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with Horizontal(id="detail-top"):
            yield Static(id="info")
            with Vertical(id="charts"):
                yield Label("requests/s", id="rate-label")
                yield Sparkline([], id="rate")
                yield Label("latency p50 ms", id="latency-label")
                yield Sparkline([], id="latency")
        yield LogView(id="log")
        yield Footer()

    def on_mount(self) -> None:
        log = self.query_one("#log", LogView)
        log.border_title = f"log · {self.babysitter_url or 'no babysitter'}"
        log.refill()
        log.focus()
        self.watch(self.app, "snapshot", self.show, init=True)
        self.watch(self.app, "stale", self._show_stale, init=True)
        if self.babysitter_url:
            self.run_worker(self._follow_log(), group="log", exclusive=True)
        else:
            self._note("this backend has no babysitter: no log to follow")

    def _show_stale(self, stale: bool) -> None:
        self.set_class(stale, "-stale")

    def show(self, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            return
        colour = self.app.colour  # type: ignore[attr-defined]
        row = snapshot.service(self.backend_name)
        info = self.query_one("#info", Static)
        if row is None:
            info.update(Text.assemble((self.backend_name, "bold"), "\n", ("not in the registry", colour("error"))))
            return
        self.row = row
        t = Text()
        t.append(row.name, "bold")
        t.append("  ")
        t.append_text(state_text(row.state, colour))
        if row.route is not None:
            t.append("  routed ", "dim")
            t.append_text(route_text(row.route, colour, self.app.data_age()))  # type: ignore[attr-defined]
        lat = row.latency
        fields = [
            ("address", row.url or row.address), ("babysitter", row.babysitter_url or "-"),
            ("models", ", ".join(row.models) or "-"), ("pid", str(row.pid) if row.pid is not None else "-"),
            ("restarts", fmt_int(row.restarts)), ("heartbeat", fmt_age(row.heartbeat_age) + " ago"),
            ("requests", fmt_int(row.requests)), ("errors", fmt_int(row.errors)),
            ("in flight", fmt_int(row.in_flight)), ("migrated", fmt_int(row.migrations)),
            ("latency ms", f"p50 {fmt_ms(lat.p50)}  p90 {fmt_ms(lat.p90)}  p99 {fmt_ms(lat.p99)}"),
        ]
        for label, value in fields:
            t.append(f"\n{label:<11}", "dim")
            t.append(value)
        info.update(t)
        points = snapshot.history.get(self.backend_name, ())
        rates = [p.rate for p in points]
        lats = [p.latency_p50 for p in points]
        self.query_one("#rate", Sparkline).data = rates
        self.query_one("#latency", Sparkline).data = lats
        self.query_one("#rate-label", Label).update(f"requests/s  now {fmt_rate(rates[-1] if rates else None)}")
        self.query_one("#latency-label", Label).update(f"latency p50 ms  now {fmt_ms(lats[-1] if lats else None)}")

    def _note(self, text: str) -> None:
        colour = self.app.colour  # type: ignore[attr-defined]
        self.query_one("#log", LogView).add(None, Text(f"-- {text} --", style=f"italic {colour('warning')}"))

    def write_line(self, line: LogLine) -> None:
        self.query_one("#log", LogView).add(line, log_text(line, self.app.colour))  # type: ignore[attr-defined]

    async def _follow_log(self) -> None:
        """Follow the babysitter's log stream; reconnect with back-off and skip lines already shown."""
        source = self.app.source  # type: ignore[attr-defined]
        delay = 0.5
        while True:
            floor = self._last_ts   # after a reconnect, the replayed tail up to here is already shown
            try:
                async for line in source.follow_logs(self.babysitter_url):
                    delay = 0.5
                    if floor and line.ts <= floor:
                        continue
                    self._last_ts = max(self._last_ts, line.ts)
                    self.write_line(line)
                self._note(f"log stream ended; reconnecting in {delay:g}s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - shown to the operator, then retried
                self._note(f"log stream lost ({type(exc).__name__}: {exc}); reconnecting in {delay:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    def action_clear_log(self) -> None:
        self.query_one("#log", LogView).forget()

    def action_act(self, action: str) -> None:
        self.app.confirm_action(self.row, action)  # type: ignore[attr-defined]
