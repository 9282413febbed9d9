"""The console driven with Pilot against a real registry, router and two babysitters running mocks."""
from __future__ import annotations

import os
import signal
import sys
import uuid

import pytest

from console.app import ConsoleApp
from console.source import HttpSource
from console_pilot import ask_action
from harness import ROOT, ProcessGroup, async_wait_for, free_port, http_get_json, http_json, wait_for, write_toml

HOST = "127.0.0.1"
TOKEN = "console-test-token"
SIZE = (160, 40)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One process hosting registry, router and babysitters bs-a and bs-b (each supervising a mock)."""
    tmp = tmp_path_factory.mktemp("console-live")
    reg, router = free_port(HOST), free_port(HOST)
    ports = {"bs-a": free_port(HOST, pair=True), "bs-b": free_port(HOST, pair=True)}
    registry_url = f"http://{HOST}:{reg}"
    write_toml(tmp / "node.toml", {
        "babysitters": ["bs-a.toml", "bs-b.toml"],
        "registry": {"bind": HOST, "port": reg, "sweep_interval": 0.2},
        "router": {"bind": HOST, "port": router, "registry_url": registry_url}})
    for name, port in ports.items():
        write_toml(tmp / f"{name}.toml", {
            "name": name, "host": HOST, "bind": HOST, "port": port, "registry_url": registry_url, "token": TOKEN,
            "babysitter": {"restart_delay": 1.0, "heartbeat_interval": 0.2, "startsecs": 0.3,
                           "health_interval": 0.2, "log_dir": f"{tmp}/logs"},
            "backend": {"type": "mock", "models": [f"model-{name[-1]}", "shared"]}})
    group = ProcessGroup(tmp)
    proc = group.start([sys.executable, "-m", "infinilm_svc", "--config", str(tmp / "node.toml")],
                       name="node", cwd=ROOT)
    try:
        def all_running():
            status, body = http_get_json(registry_url + "/services", timeout=1)
            states = {s["name"]: s["status"] for s in body.get("services", [])} if status == 200 else {}
            return len(states) == 5 and states.get("bs-a-server") == "running" \
                and states.get("bs-b-server") == "running" and states
        wait_for(all_running, timeout=20, what=f"5 records, backends running ({group.output(proc)[-2000:]})")
        yield {"registry": registry_url, "router": f"http://{HOST}:{router}", "ports": ports}
    finally:
        group.kill_all()


def make_app(deployment) -> ConsoleApp:
    return ConsoleApp(HttpSource(deployment["registry"], token=TOKEN), interval=0.2)


def rows(app: ConsoleApp) -> list[str]:
    return app.screen.query_one("#services").row_keys()


def cell(app: ConsoleApp, key: str, column: str) -> str:
    table = app.screen.query_one("#services")
    if key not in table.row_keys():
        return ""
    value = table.get_cell(key, column)
    return getattr(value, "plain", str(value))


def backend_pid(deployment, name: str) -> int:
    status, body = http_get_json(f"{deployment['registry']}/services/{name}")
    assert status == 200, body
    return int(body["metadata"]["pid"])


async def _wait_running(app: ConsoleApp, *names: str) -> None:
    async def ok():
        return all(cell(app, n, "state") == "running" for n in names)
    await async_wait_for(ok, timeout=20, what=f"{names} running in the console")


async def test_rows_appear_and_filter_narrows_them(deployment):
    """All five services appear with their roles; `/` + text narrows the rows; esc brings them back."""
    app = make_app(deployment)
    async with app.run_test(size=SIZE) as pilot:
        async def five():
            return len(rows(app)) == 5
        await async_wait_for(five, what="5 rows", timeout=10)
        assert {cell(app, n, "role") for n in rows(app)} == {"babysitter", "backend", "router"}
        await _wait_running(app, "bs-a-server", "bs-b-server")
        assert "connected" in str(app.screen.query_one("#status").render())
        await pilot.press("slash", *"bs-b")
        async def narrowed():
            return sorted(rows(app)) == ["bs-b", "bs-b-server"]
        await async_wait_for(narrowed, what="rows filtered to bs-b")
        await pilot.press("escape")
        await async_wait_for(five, what="all rows back")


async def test_log_pane_shows_a_request_log_line(deployment):
    """The detail view follows the babysitter's log: a request sent through the router shows up by its id."""
    app = make_app(deployment)
    async with app.run_test(size=SIZE) as pilot:
        await _wait_running(app, "bs-a-server")
        table = app.screen.query_one("#services")
        table.move_cursor(row=table.get_row_index("bs-a-server"))
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen.id == "detail-screen"
        rid = "console-" + uuid.uuid4().hex[:8]
        status, body = http_json("POST", deployment["router"] + "/v1/chat/completions",
                                 {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"X-Request-ID": rid})
        assert status == 200, body
        log = app.screen.query_one("#log")

        async def seen():
            return [s.text for s in log.lines if f"request id={rid}" in s.text]
        lines = await async_wait_for(seen, timeout=10, what=f"log line for {rid}")
        assert "path=/v1/chat/completions model=model-a" in lines[0]


async def test_restart_after_confirmation_restarts_the_backend(deployment):
    """`r` on a backend asks first; after `y` the babysitter restarts it (new pid, restarts + 1 on screen)."""
    app = make_app(deployment)
    async with app.run_test(size=SIZE) as pilot:
        await _wait_running(app, "bs-b-server")
        before_pid = backend_pid(deployment, "bs-b-server")
        before = int(cell(app, "bs-b-server", "restarts"))
        assert "Restart bs-b-server?" in await ask_action(pilot, "bs-b-server")
        await pilot.press("y")

        async def restarted():
            return cell(app, "bs-b-server", "restarts") == str(before + 1) \
                and cell(app, "bs-b-server", "state") == "running"
        await async_wait_for(restarted, timeout=20, what="restarts + 1 and running again")
        assert backend_pid(deployment, "bs-b-server") != before_pid


async def test_killed_backend_changes_state_and_recovers(deployment):
    """Killing a backend's process shows it leave `running` (backoff/starting), then come back."""
    app = make_app(deployment)
    async with app.run_test(size=SIZE):
        await _wait_running(app, "bs-a-server")
        os.kill(backend_pid(deployment, "bs-a-server"), signal.SIGKILL)
        seen: set[str] = set()

        async def left_running():
            seen.add(cell(app, "bs-a-server", "state"))
            return seen - {"running", ""}
        states = await async_wait_for(left_running, timeout=15, what="bs-a-server not running")
        assert states & {"backoff", "starting", "stopped", "fatal"}, states

        async def back():
            return cell(app, "bs-a-server", "state") == "running"
        await async_wait_for(back, timeout=20, what="bs-a-server running again")


async def test_validation_screen_shows_each_check_as_it_arrives(deployment):
    """`v` runs the validate checks against this deployment; results appear in the table as they complete."""
    app = make_app(deployment)
    async with app.run_test(size=SIZE) as pilot:
        await _wait_running(app, "bs-a-server", "bs-b-server")
        await pilot.press("v")
        await pilot.pause()
        assert app.screen.id == "validation-screen"
        status = app.screen.query_one("#vstatus")

        async def done():
            return "done in" in str(status.render()) and str(status.render())
        final = await async_wait_for(done, timeout=40, what="validation finished")
        table = app.screen.query_one("#checks")
        results = {table.get_cell(k, "name"): table.get_cell(k, "result").plain for k in table.row_keys()}
        print(final, results)
        assert len(results) >= 9
        assert all(v in ("PASS", "FAIL") for v in results.values())
        assert f"{list(results.values()).count('PASS')} passed" in final
