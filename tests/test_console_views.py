"""Console views on fixed, fake data: snapshots of services/models/detail, filter, sort, cursor, stale, confirm."""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace

import pytest

from console.app import ConsoleApp
from console.rows import Latency, ModelRow, Point, Route, ServiceRow, Snapshot
from console_pilot import ask_action
from harness import async_wait_for
from infinilm_svc.client.babysitter import LogLine

T0 = 1_700_000_000.0
SIZE = (150, 40)


OK = Route(1, 1)


def _backend(name: str, host: str, port: int, models: tuple[str, ...], state: str = "running", *,
             requests: int = 0, errors: int = 0, restarts: int = 0, hb: float = 1.2,
             route: Route | None = OK) -> ServiceRow:
    sitter = name.removesuffix("-server")
    return ServiceRow(name=name, role="backend", host=host, port=port, url=f"http://{host}:{port}", state=state,
                      heartbeat_age=hb, healthy=state == "running", restarts=restarts, models=models,
                      babysitter_url=f"http://{host}:{port + 1}", pid=4000 + port % 100, started_at=T0 - 300,
                      requests=requests, errors=errors, in_flight=1 if requests else 0,
                      latency=Latency(12.5, 40.0, 95.0) if requests else Latency(), route=route,
                      metadata={"parent_service": sitter})


def _sitter(name: str, host: str, port: int, models: tuple[str, ...], state: str = "running",
            restarts: int = 0, hb: float = 0.8) -> ServiceRow:
    return ServiceRow(name=name, role="babysitter", host=host, port=port + 1, url=f"http://{host}:{port + 1}",
                      state=state, heartbeat_age=hb, healthy=state == "running", restarts=restarts, models=models,
                      babysitter_url=f"http://{host}:{port + 1}", backend=f"{name}-server")


def fake_snapshot(taken_at: float = T0) -> Snapshot:
    """The demo deployment: 1 router, 4 babysitters and backends, one backend in backoff, one stale."""
    services = (
        _sitter("babysitter-a", "127.0.0.2", 8100, ("model-1",)),
        _sitter("babysitter-b", "127.0.0.2", 8200, ("model-2",)),
        _sitter("babysitter-c", "127.0.0.3", 8100, ("model-1",), state="backoff", restarts=3),
        _sitter("babysitter-d", "127.0.0.3", 8200, ("model-2",), hb=140.0, state="stale"),
        _backend("babysitter-a-server", "127.0.0.2", 8100, ("model-1",), requests=17102, errors=2),
        _backend("babysitter-b-server", "127.0.0.2", 8200, ("model-2",), requests=1498, errors=4,
                 route=Route(1, 0, "circuit open", 8.0)),
        _backend("babysitter-c-server", "127.0.0.3", 8100, ("model-1",), state="backoff", restarts=3,
                 requests=37, errors=5, route=Route(1, 0, "registry: backoff")),
        _backend("babysitter-d-server", "127.0.0.3", 8200, ("model-2",), state="stale", hb=140.0, requests=810,
                 route=Route(1, 0, "health check failing")),
        ServiceRow(name="router-127.0.0.2-8000", role="router", host="127.0.0.2", port=8000,
                   url="http://127.0.0.2:8000", state="running", heartbeat_age=0.5, healthy=True,
                   metadata={"url": "http://127.0.0.2:8000"}),
    )
    models = (
        ModelRow("model-1", ("babysitter-a-server", "babysitter-c-server"), healthy=1, requests=17139, errors=7,
                 rate=42.5, latency=Latency(13.0, 41.0, 99.0)),
        ModelRow("model-2", ("babysitter-b-server", "babysitter-d-server"), healthy=0, requests=2308, errors=4,
                 rate=38.0, latency=Latency(11.0, 35.0, 80.0), lost=("babysitter-e-server",)),
    )
    history = {"babysitter-a-server": tuple(Point(T0 - 2 * (30 - i), float((i * 7) % 23), 10.0 + (i * 5) % 9)
                                            for i in range(30))}
    return Snapshot(taken_at=taken_at, services=services, models=models, routers_answered=1, history=history)


LOG = [LogLine(T0 + i, "babysitter" if i == 0 else "stdout",
               "backend started (pid 4100)" if i == 0 else
               f"request id=req-{i:04d} method=POST path=/v1/chat/completions model=model-1 stream=false status=200")
       for i in range(6)]


class FakeSource:
    """Serves fixed snapshots and log lines; records actions."""

    registry_url = "http://127.0.0.2:18000"
    token = None

    def __init__(self, snapshots: list[Snapshot] | None = None, fail: bool = False) -> None:
        self.snapshots = snapshots or [fake_snapshot()]
        self.fail = fail
        self.actions: list[tuple[str, str]] = []
        self.log = list(LOG)

    async def poll(self) -> Snapshot:
        if self.fail:
            raise ConnectionError("connection refused")
        return self.snapshots[0] if len(self.snapshots) == 1 else self.snapshots.pop(0)

    async def follow_logs(self, url: str, tail: int = 200):
        for line in self.log:
            yield line
        await asyncio.Event().wait()

    async def act(self, url: str, action: str) -> str:
        self.actions.append((url, action))
        return "ok"


class FrozenClock:
    """A monotonic clock that moves only when a test moves it (ages and countdowns stay put)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_app(source: FakeSource | None = None) -> ConsoleApp:
    """An app fed once from the fake source, with no timer and a frozen clock (deterministic)."""
    return ConsoleApp(source or FakeSource(), interval=2.0, autopoll=False, clock=FrozenClock())


async def _load(pilot) -> None:
    await pilot.app.poll_once()
    await pilot.pause()


def table_rows(app: ConsoleApp, selector: str = "#services") -> list[str]:
    return app.screen.query_one(selector).row_keys()


def cell_text(app: ConsoleApp, key: str, column: str, selector: str = "#services") -> str:
    value = app.screen.query_one(selector).get_cell(key, column)
    return getattr(value, "plain", str(value))


# -- snapshots ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_snapshot_services_view(snap_compare):
    """The services view: states colour-coded, whether routed (an open circuit counting down), heartbeat
    ages, restarts, models, router statistics with a five-digit REQS."""
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=_load)


def test_snapshot_models_view(snap_compare):
    """The models view: each model with its backends, healthy count, a backend lost recently, request rate."""
    async def run_before(pilot):
        await _load(pilot)
        await pilot.press("m")
        await pilot.pause()
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_snapshot_backend_detail_view(snap_compare):
    """The backend detail: info, sparklines of rate and latency, and the followed log."""
    async def run_before(pilot):
        await _load(pilot)
        await pilot.press("down", "down", "down", "down", "enter")   # babysitter-a-server (rows sorted by role)
        app = pilot.app
        await pilot.pause()
        log = app.screen.query_one("#log")
        deadline = time.monotonic() + 5
        while len(log.lines) < len(LOG) and time.monotonic() < deadline:
            await pilot.pause(0.02)
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def _long_log() -> list[LogLine]:
    """A backend's log as the demo writes it: user requests, and health/model-list probes every 2 s."""
    out = [LogLine(T0, "babysitter", "backend started (pid 4100)")]
    for i in range(1, 80):
        if i % 3 == 0:
            out.append(LogLine(T0 + i, "stdout", f"request id=req-{i:04d} method=POST path=/v1/chat/completions "
                                                  f"model=model-1 stream=false status=200 "
                                                  f"prompt_tokens={i} completion_tokens={2 * i} " + "x" * 90))
        else:
            path = "/health" if i % 3 == 1 else "/v1/models"
            out.append(LogLine(T0 + i, "stdout", f"request id=- method=GET path={path} model=- stream=false status=200"))
    return out


class LiveLogSource(FakeSource):
    """A babysitter whose log keeps growing: lines put on `more` arrive while the view is open."""

    def __init__(self, log: list[LogLine]) -> None:
        super().__init__()
        self.log = log
        self.more: asyncio.Queue[LogLine] = asyncio.Queue()

    async def follow_logs(self, url: str, tail: int = 200):
        for line in self.log:
            yield line
        while True:
            yield await self.more.get()


async def _open_log(pilot, count: int):
    """Open babysitter-a-server's detail and wait until `count` lines are in its log."""
    app = pilot.app
    await _load(pilot)
    app.open_detail(app.snapshot.service("babysitter-a-server"))
    await pilot.pause()
    log = app.screen.query_one("#log")

    async def arrived():
        await pilot.pause()
        return len(log.entries) >= count
    await async_wait_for(arrived, timeout=10, what=f"{count} log lines")
    await pilot.pause()
    return log


def test_snapshot_detail_log_scrolled_back(snap_compare):
    """The log scrolled back to its start with PageUp/Home: probe lines hidden, long lines wrapped, and it
    stays there while new lines arrive."""
    source = LiveLogSource(_long_log())

    async def run_before(pilot):
        log = await _open_log(pilot, len(source.log))
        await pilot.press("pageup", "home")
        await pilot.pause()
        source.more.put_nowait(LogLine(T0 + 100, "stdout", "request id=req-0100 method=POST path=/v1/chat/completions "
                                                           "model=model-1 stream=false status=200"))
        await async_wait_for(lambda: _true(len(log.entries) > len(source.log)), what="the new line")
        await pilot.pause()
    assert snap_compare(make_app(source), terminal_size=SIZE, run_before=run_before)


async def _true(value: bool) -> bool:
    return value


async def test_log_scrolls_back_from_the_keyboard_and_follows_again_at_the_bottom():
    """Up/PageUp/Home leave the bottom and new lines do not pull the view back; End resumes following."""
    source = LiveLogSource(_long_log())
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        log = await _open_log(pilot, len(source.log))
        assert log.has_focus and log.following and log.max_scroll_y > 0
        await pilot.press("pageup", "up")
        await pilot.pause()
        where = log.scroll_y
        assert where < log.max_scroll_y
        for i in range(5):
            source.more.put_nowait(LogLine(T0 + 200 + i, "stdout", f"request id=late-{i} method=POST path=/v1/completions"))
        await async_wait_for(lambda: _true(len(log.entries) == len(source.log) + 5), what="5 new lines")
        await pilot.pause()
        assert log.scroll_y == where                       # still where the operator scrolled to
        await pilot.press("end")
        await pilot.pause()
        source.more.put_nowait(LogLine(T0 + 300, "stdout", "request id=last method=POST path=/v1/completions"))
        await async_wait_for(lambda: _true(len(log.entries) == len(source.log) + 6), what="one more line")
        await pilot.pause()
        assert log.following and log.scroll_y == log.max_scroll_y


async def test_probe_lines_are_hidden_and_h_shows_them():
    """Health and model-list probes are hidden by default (the subtitle counts them); `h` toggles them."""
    source = LiveLogSource(_long_log())
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        log = await _open_log(pilot, len(source.log))
        shown = " ".join(s.text for s in log.lines)
        assert "req-0003" in shown and "path=/health" not in shown and "path=/v1/models" not in shown
        assert "backend started (pid 4100)" in shown
        assert "53 probe lines hidden" in str(log.border_subtitle)
        await pilot.press("h")
        await pilot.pause()
        shown = " ".join(s.text for s in log.lines)
        assert "path=/health" in shown and "path=/v1/models" in shown and "req-0003" in shown
        assert "probes shown" in str(log.border_subtitle)


async def test_a_notice_does_not_cover_the_log():
    """The "done" notice of an action shows at the top right, clear of the detail view's log."""
    from textual.widgets._toast import Toast

    source = LiveLogSource(_long_log())
    app = make_app(source)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        log = await _open_log(pilot, len(source.log))
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("y")

        async def shown():
            await pilot.pause()
            return list(app.screen.query(Toast))
        toasts = await async_wait_for(shown, timeout=5, what="the done notice")
        assert source.actions == [("http://127.0.0.2:8101", "restart")]
        for toast in toasts:
            assert not toast.region.overlaps(log.region), (toast.region, log.region)


async def test_help_lists_every_key():
    """The help dialog names every key the screens bind, including c (clear log), h, R and ^p."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        text = str(app.screen.query_one("Static").render())
        for key in ("?", "/", "enter", "m", "s", "S", "r", "x", "t", "v", "p", "+ / -", "q", "esc",
                    "c", "h", "R", "^p", "PgUp", "End"):
            assert re.search(rf"(^|\s){re.escape(key)}(\s{{2,}}|\s[A-Z↑↓])", text, re.M), (key, text)


# -- behaviour on fake data ----------------------------------------------------------------------

async def test_a_number_that_grows_widens_its_column_instead_of_losing_digits():
    """REQS going from 999 to 1,710 (and then 12,345) shows every digit after each refresh."""
    first = fake_snapshot()
    rows = list(first.services)
    rows[4] = replace(rows[4], requests=999, errors=0)
    grown = [replace(first, services=tuple(rows))]
    for n in (1710, 12345):
        rows[4] = replace(rows[4], requests=n)
        grown.append(replace(first, services=tuple(rows)))
    app = make_app(FakeSource(grown))
    async with app.run_test(size=(200, 40)) as pilot:
        for expected in ("999", "1,710", "12,345"):
            await _load(pilot)
            table = app.screen.query_one("#services")
            assert cell_text(app, "babysitter-a-server", "requests") == expected
            shown = {str(c.label): c.content_width for c in table.columns.values()}
            assert shown["REQS"] >= len(expected), (expected, shown)


async def test_filter_narrows_rows_and_esc_restores_them():
    """`/` then typing keeps only matching rows; esc clears the filter and every row comes back."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        assert len(table_rows(app)) == 9
        await pilot.press("slash", *"model-2")
        await pilot.pause()
        assert table_rows(app) == ["babysitter-b", "babysitter-d", "babysitter-b-server", "babysitter-d-server"]
        await pilot.press("enter")          # keeps the filter, back to the table
        await app.poll_once()                # a refresh keeps the filter
        await pilot.pause()
        assert len(table_rows(app)) == 4
        await pilot.press("escape")
        await pilot.pause()
        assert len(table_rows(app)) == 9


async def test_cursor_stays_on_its_row_when_rows_change_and_state_updates_in_place():
    """A refresh that adds a row above, changes a state and re-sorts keeps the cursor on the same service."""
    first = fake_snapshot()
    changed = list(first.services)
    changed[4] = replace(changed[4], state="backoff", healthy=False, restarts=1)   # babysitter-a-server
    extra = replace(changed[0], name="aaa-babysitter", host="127.0.0.4")
    second = replace(first, services=(extra, *changed))
    app = make_app(FakeSource([first, second]))
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        await pilot.press("s")              # sort by name
        await pilot.pause()
        table = app.screen.query_one("#services")
        table.move_cursor(row=table.get_row_index("babysitter-a-server"))
        await pilot.pause()
        await app.poll_once()
        await pilot.pause()
        assert table.cursor_key == "babysitter-a-server"
        assert table_rows(app)[0] == "aaa-babysitter"
        assert cell_text(app, "babysitter-a-server", "state") == "backoff"
        assert cell_text(app, "babysitter-a-server", "restarts") == "1"


async def test_unreachable_registry_keeps_last_data_marked_stale_with_backoff():
    """When polls fail the rows stay, the screen is marked stale and the header says it is retrying."""
    source = FakeSource()
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        source.fail = True
        await app.poll_once()
        await app.poll_once()
        await pilot.pause()
        header = str(app.screen.query_one("#status").render())
        assert "unreachable" in header and "2 failed" in header and "STALE" in header
        assert app.status.retry_in == 8.0          # 2 s doubled per failure
        assert len(table_rows(app)) == 9
        assert app.screen.has_class("-stale")
        source.fail = False
        await app.poll_once()
        await pilot.pause()
        assert "connected" in str(app.screen.query_one("#status").render())
        assert not app.screen.has_class("-stale")


def test_stale_header_counts_down_live():
    """The retry countdown and the age of stale data move with the clock, not only on each poll."""
    from console.status import Status

    status = Status(registry="http://r", connected=False, failures=3, retry_in=16.0, stale_for=14.0,
                    retry_at=1000.0, last_ok_at=970.0)
    first, later = status.line(now=984.0), status.line(now=995.0)
    assert "retrying in 16s" in first and "STALE[/b] data from 14s ago" in first
    assert "retrying in 5s" in later and "STALE[/b] data from 25s ago" in later


async def test_R_reconnects_at_once_after_the_registry_is_back():
    """With the registry back, R polls now instead of waiting out the back-off."""
    source = FakeSource()
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        source.fail = True
        await app.poll_once()
        await pilot.pause()
        assert app.status.connected is False and app.screen.has_class("-stale")
        source.fail = False
        await pilot.press("R")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.status.connected is True and not app.screen.has_class("-stale")
        assert "connected" in str(app.screen.query_one("#status").render())


async def test_stale_rows_lose_their_green():
    """While the data is stale a running row is not shown in the success colour."""
    source = FakeSource()
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        green = app.screen.query_one("#services").get_cell("babysitter-a", "state").style
        assert app.theme_variables["success"] in str(green)
        source.fail = True
        await app.poll_once()
        await pilot.pause()
        stale = app.screen.query_one("#services").get_cell("babysitter-a", "state").style
        assert app.theme_variables["success"] not in str(stale)


async def test_the_sorting_column_shows_its_direction_and_the_cursor_stays_on_its_service():
    """`s` marks the sorted column ▲, `S` turns it ▼; the cursor follows its service as rows move."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        table = app.screen.query_one("#services")
        table.move_cursor(row=table.get_row_index("router-127.0.0.2-8000"))
        await pilot.press("s")              # by name
        await pilot.pause()
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[0] == "NAME ▲" and all("▲" not in lab and "▼" not in lab for lab in labels[1:]), labels
        assert table.cursor_key == "router-127.0.0.2-8000"
        assert table_rows(app)[-1] == "router-127.0.0.2-8000"
        await pilot.press("S")
        await pilot.pause()
        assert str(table.columns[next(iter(table.columns))].label) == "NAME ▼"
        assert table_rows(app)[0] == "router-127.0.0.2-8000" and table.cursor_key == "router-127.0.0.2-8000"


async def test_heartbeat_ages_tick_between_polls():
    """With no new poll, a heartbeat age shown as 1.2s becomes 2.2s a second later (and so on)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        assert cell_text(app, "babysitter-a-server", "hb") == "1.2s"
        app.clock.now += 1.0

        async def ticked():
            await pilot.pause()
            return cell_text(app, "babysitter-a-server", "hb") == "2.2s"
        await async_wait_for(ticked, timeout=5, what="the age to tick without a poll")
        assert app.polls == 1


async def test_a_deregistered_service_shows_gone_and_is_not_counted():
    """A record that left cleanly reads `gone` with no heartbeat age; the header counts only the registered."""
    first = fake_snapshot()
    rows = list(first.services)
    rows[0] = replace(rows[0], state="gone", healthy=False, heartbeat_age=None)
    app = make_app(FakeSource([replace(first, services=tuple(rows))]))
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        assert cell_text(app, "babysitter-a", "state") == "gone" and cell_text(app, "babysitter-a", "hb") == "-"
        assert "8 services" in str(app.screen.query_one("#status").render())


async def test_enter_on_a_model_opens_its_backends():
    """In the models view, enter goes back to the services filtered to that model."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        await pilot.press("m")
        await pilot.pause()
        await pilot.press("down", "enter")            # model-2
        await pilot.pause()
        assert app.screen.id == "services-screen"
        assert table_rows(app) == ["babysitter-b", "babysitter-d", "babysitter-b-server", "babysitter-d-server"]


async def test_restart_asks_first_and_only_acts_on_yes():
    """`r` opens a confirmation; `n` does nothing, `y` posts restart to the row's babysitter."""
    source = FakeSource()
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        assert "Restart babysitter-c-server?" in await ask_action(pilot, "babysitter-c")
        await pilot.press("n")
        await pilot.pause()
        assert source.actions == []
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("y")
        await app.workers.wait_for_complete()
        assert source.actions == [("http://127.0.0.3:8101", "restart")]


async def test_pause_and_interval_keys_show_in_header():
    """`p` pauses (header says PAUSED), `+`/`-` change the refresh interval."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        await pilot.press("plus")
        assert app.interval == 5.0
        await pilot.press("minus", "minus")
        assert app.interval == 1.0
        await pilot.press("p")
        await pilot.pause()
        assert "PAUSED" in str(app.screen.query_one("#status").render())
        await pilot.press("question_mark")
        await pilot.pause()
        assert "restart backend" in str(app.screen.query_one("Static").render())


class RestartingLogSource(FakeSource):
    """A babysitter whose log stream breaks (it restarted) and, on reconnect, replays its tail plus new lines."""

    NEW = LogLine(T0 + 10, "babysitter", "babysitter restarted; backend started (pid 4200)")

    def __init__(self) -> None:
        super().__init__()
        self.connects = 0

    async def follow_logs(self, url: str, tail: int = 200):
        self.connects += 1
        if self.connects == 1:
            for line in self.log:
                yield line
            raise ConnectionError("babysitter went away")
        for line in self.log + [self.NEW]:
            yield line
        await asyncio.Event().wait()


async def test_log_follow_reconnects_after_babysitter_restart_without_repeating_lines():
    """A broken log stream is reported and reconnected; the replayed tail is not shown twice, new lines are."""
    source = RestartingLogSource()
    app = make_app(source)
    async with app.run_test(size=SIZE) as pilot:
        await _load(pilot)
        app.open_detail(app.snapshot.service("babysitter-a-server"))
        await pilot.pause()
        log = app.screen.query_one("#log")

        async def new_line_shown():
            return any(RestartingLogSource.NEW.line in s.text for s in log.lines)
        await async_wait_for(new_line_shown, timeout=10, what="the line logged after the reconnect")
        texts = [text.plain for _, text in log.entries]
        assert source.connects == 2
        assert any("log stream lost (ConnectionError: babysitter went away); reconnecting" in t for t in texts), texts
        for line in LOG:
            assert sum(t.endswith(line.line) for t in texts) == 1, (line.line, texts)


async def test_pressing_R_twice_at_once_leaves_no_poll_coroutine_unawaited():
    """The second R replaces the first poll before it ran (one poll at a time): the replaced poll
    must not leave a coroutine that was never awaited (Python warns at collection; seen as a
    RuntimeWarning in a suite run), and the poll that did run brings the data."""
    import gc
    import warnings

    source = FakeSource()
    app = make_app(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with app.run_test(size=SIZE):
            app.action_reconnect()
            app.action_reconnect()
            await async_wait_for(lambda: _true(app.status.connected is True and not app.workers),
                                 what="the second poll done")
            assert app.polls == 1
        gc.collect()
    unawaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert not unawaited, unawaited
