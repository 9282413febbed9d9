"""The console App: one poll at a time on a self-re-arming timer, screens fed from the latest snapshot."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.timer import Timer

from infinilm_svc.client.babysitter import BabysitterError

from .rows import GONE_STATES, ServiceRow, Snapshot, backend_target
from .status import Status

INTERVALS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_BACKOFF = 30.0


class ConsoleApp(App):
    """The ops console. `source` provides poll(), follow_logs(url), act(url, action) and registry_url."""

    CSS_PATH = "console.tcss"
    TITLE = "infinilm-svc console"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("p", "pause", "Pause"),
        Binding("plus,equals_sign", "slower", "Slower", show=False),
        Binding("minus", "faster", "Faster", show=False),
        Binding("R", "reconnect", "Reconnect", show=False),
    ]

    snapshot: reactive[Snapshot | None] = reactive(None, always_update=True)
    status: reactive[Status] = reactive(Status(registry=""), always_update=True)
    stale: reactive[bool] = reactive(False)

    def __init__(self, source: Any, interval: float = 2.0, autopoll: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock     # what ages and countdowns are computed against (tests freeze it)
        self.source = source
        self.interval = interval
        self.autopoll = autopoll
        self.paused = False
        self.failures = 0
        self.last_ok: float | None = None
        self.published_at: float | None = None   # monotonic time the shown snapshot arrived
        self._timer: Timer | None = None
        self.polls = 0
        self.set_reactive(ConsoleApp.status, Status(registry=source.registry_url, interval=interval))

    def colour(self, kind: str) -> str:
        """A state kind (success, warning, error, muted) as a colour of the current theme."""
        if kind == "muted":
            return ""
        return self.theme_variables.get(kind, "")

    def cell_colour(self) -> Callable[[str], str]:
        """Colours for table cells: stale data loses its green (nothing is known to be fine now)."""
        if not self.stale:
            return self.colour
        return lambda kind: "" if kind == "success" else self.colour(kind)

    def data_age(self) -> float:
        """Whole seconds since the shown snapshot was taken (ages tick in whole seconds between polls)."""
        if self.published_at is None:
            return 0.0
        return float(int(self.clock() - self.published_at))

    def on_mount(self) -> None:
        from .services import ServicesScreen

        self.push_screen(ServicesScreen())
        if self.autopoll:
            self._arm(0)

    async def on_unmount(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            await close()

    # -- polling: one finite worker per tick; it re-arms the timer when done -------------------------

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(max(delay, 0.001), self._tick)   # a 0 s timer divides by zero

    def _tick(self) -> None:
        self._timer = None
        if not self.paused:
            self._poll_worker()

    @work(group="poll", exclusive=True, exit_on_error=False)
    async def _poll_worker(self) -> None:
        """One poll, as the only poll worker. Textual makes the coroutine when the worker starts, so
        a worker replaced before it started leaves no coroutine that was never awaited."""
        await self.poll_once()

    async def poll_once(self) -> None:
        """Poll the source once, publish the snapshot or the failure, and schedule the next poll."""
        self.polls += 1
        try:
            snap = await self.source.poll()
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the header and retried
            self.failures += 1
            delay = min(self.interval * 2 ** self.failures, MAX_BACKOFF)
            stale_for = self.clock() - self.last_ok if self.last_ok is not None else None
            self.stale = self.snapshot is not None
            self.status = replace(self.status, connected=False, error=str(exc), failures=self.failures,
                                  retry_in=delay, stale_for=stale_for, retry_at=self.clock() + delay,
                                  last_ok_at=self.last_ok)
        else:
            self.failures = 0
            delay = self.interval
            self.last_ok = self.clock()
            self.publish(snap)
        if self.autopoll and not self.paused:
            self._arm(delay)

    def publish(self, snap: Snapshot) -> None:
        """Show a snapshot as the current, fresh data (tests feed fixed snapshots through here)."""
        self.stale = False
        self.published_at = self.clock()
        self.snapshot = snap
        self.status = replace(self.status, connected=True, error="", failures=0, retry_in=0.0, stale_for=None,
                              retry_at=None, last_ok_at=None,
                              services=snap.registered,
                              routers=sum(1 for s in snap.services if s.role == "router" and s.state not in GONE_STATES),
                              router_errors=len(snap.router_errors))

    def poll_soon(self) -> None:
        """Refresh now if no poll is running (after an action); a running poll re-arms by itself."""
        if self._timer is not None and not self.paused:
            self._arm(0.05)

    # -- keys -------------------------------------------------------------------------------------

    def action_help(self) -> None:
        from .dialogs import HelpScreen

        self.push_screen(HelpScreen())

    def action_reconnect(self) -> None:
        """Poll now instead of waiting out the back-off (after the registry came back)."""
        if self.paused:
            self.notify("paused: p resumes refreshing", timeout=2)
            return
        if self.autopoll:
            self._arm(0)
        else:
            self._poll_worker()
        if self.status.connected is False:
            self.notify("reconnecting now", timeout=1.5)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.status = replace(self.status, paused=self.paused)
        if self.paused:
            if self._timer is not None:
                self._timer.stop()
                self._timer = None
        elif self.autopoll:
            self._arm(0)

    def _set_interval(self, step: int) -> None:
        i = min(range(len(INTERVALS)), key=lambda j: abs(INTERVALS[j] - self.interval))
        self.interval = INTERVALS[max(0, min(len(INTERVALS) - 1, i + step))]
        self.status = replace(self.status, interval=self.interval)
        if self._timer is not None and self.failures == 0:
            self._arm(self.interval)

    def action_slower(self) -> None:
        self._set_interval(+1)

    def action_faster(self) -> None:
        self._set_interval(-1)

    def action_models(self) -> None:
        from .models import ModelsScreen

        self.push_screen(ModelsScreen())

    def action_validate(self) -> None:
        from .validation import ValidationScreen

        self.push_screen(ValidationScreen())

    def open_detail(self, row: ServiceRow | None) -> None:
        from .detail import DetailScreen

        target = backend_target(self.snapshot, row)
        if target is None:
            self.notify("select a backend or babysitter row for its detail", severity="warning")
            return
        url = target.babysitter_url or (target.url if target.role == "babysitter" else None)
        self.push_screen(DetailScreen(target.name, url))

    def confirm_action(self, row: ServiceRow | None, action: str) -> None:
        """Ask, then restart/stop/start the row's backend through its babysitter."""
        from .dialogs import ConfirmScreen

        target = backend_target(self.snapshot, row)
        url = None
        if target is not None:
            url = target.babysitter_url or (target.url if target.role == "babysitter" else None)
        if target is None or not url:
            self.notify(f"cannot {action}: select a backend that has a babysitter", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._act(target.name, url, action), group="act")
            else:
                self.notify(f"{action} of {target.name} cancelled", timeout=2)

        self.push_screen(ConfirmScreen(f"{action.capitalize()} {target.name}?", f"through its babysitter at {url}"),
                         answered)

    async def _act(self, name: str, url: str, action: str) -> None:
        try:
            message = await self.source.act(url, action)
        except BabysitterError as exc:
            self.notify(str(exc), title=f"{action} {name} failed", severity="error", timeout=8)
        else:
            self.notify(f"{action} {name}: {message}", title="done")
        self.poll_soon()
