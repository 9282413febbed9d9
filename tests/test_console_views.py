"""Console views on fixed, fake data: snapshots of services/models/detail, filter, sort, cursor, stale, confirm."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from console.app import ConsoleApp
from console.data import Latency, LogLine, ModelRow, Point, Route, ServiceRow, Snapshot
from conftest import async_wait_for
from console_pilot import ask_action

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


def make_app(source: FakeSource | None = None) -> ConsoleApp:
    """An app fed once from the fake source, with no timer (deterministic)."""
    return ConsoleApp(source or FakeSource(), interval=2.0, autopoll=False)


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
        texts = [s.text for s in log.lines]
        assert source.connects == 2
        assert any("log stream lost (ConnectionError: babysitter went away); reconnecting" in t for t in texts), texts
        for line in LOG:
            assert sum(line.line in t for t in texts) == 1, (line.line, texts)
