"""Background loops under the TaskSupervisor: a loop that raises is logged, shown in /health, and
restarted with back-off, so the role keeps doing its work."""
from __future__ import annotations

import asyncio
import logging

from harness import async_wait_for
from infinilm_svc.background import TaskSupervisor
from infinilm_svc.config import RegistryConfig
from infinilm_svc.registry.app import TABLE, create_app


async def test_a_failing_loop_is_restarted_with_back_off_and_reported(caplog):
    runs = []

    async def flaky():
        runs.append(1)
        if len(runs) <= 3:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.Event().wait()

    tasks = TaskSupervisor("test", min_delay=0.01, max_delay=0.05)
    with caplog.at_level(logging.ERROR, logger="infinilm_svc.background"):
        tasks.spawn("flaky", flaky)
        await async_wait_for(lambda: (len(runs) == 4), timeout=5, what="the fourth run")
    rep = tasks.report()["flaky"]
    assert rep["state"] == "running" and rep["failures"] == 3 and rep["last_error"] == "RuntimeError: boom 3"
    assert sum("background task flaky failed" in r.getMessage() for r in caplog.records) == 3
    assert not tasks.degraded
    await tasks.close()


async def test_a_loop_that_returns_is_done_not_restarted():
    runs = []

    async def once():
        runs.append(1)

    tasks = TaskSupervisor("test", min_delay=0.01)
    tasks.spawn("once", once)
    await async_wait_for(lambda: (tasks.report()["once"]["state"] == "done"), timeout=5, what="done")
    assert runs == [1]
    await tasks.close()


async def test_the_registry_sweep_survives_a_failure_and_health_shows_it(aiohttp_client):
    cfg = RegistryConfig(bind="127.0.0.1", heartbeat_ttl=0.2, expire_after=0.4, sweep_interval=0.05, probe_interval=0)
    app = create_app(cfg)
    table = app[TABLE]
    real_sweep = table.sweep
    calls = []

    def broken_then_fine():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a record the sweep could not handle")
        return real_sweep()

    table.sweep = broken_then_fine  # type: ignore[method-assign]
    client = await aiohttp_client(app)

    async def failure_shown():
        h = await (await client.get("/health")).json()
        return h["tasks"]["sweep"]["failures"] == 1 and h
    h = await async_wait_for(failure_shown, timeout=5, what="the sweep failure in /health")
    assert "a record the sweep could not handle" in h["tasks"]["sweep"]["last_error"]
    # The sweep runs again: a record without heartbeats still expires.
    assert (await client.post("/services", json={"name": "a", "host": "127.0.0.1", "port": 9000})).status == 201

    async def expired():
        return (await client.get("/services/a")).status == 404
    await async_wait_for(expired, timeout=10, what="expiry after the sweep came back")
    h = await (await client.get("/health")).json()
    assert h["status"] == "healthy" and h["tasks"]["sweep"]["state"] == "running"

