"""A router with a large fleet: health checks spread and bounded, nothing holding the event loop.

With 10,000 registered backends the router used to stop its loop for seconds at a time: every
health-check pass started a check of every backend at once, /metrics was built in one go (31.9 MB),
and every registry answer was applied in one go. These tests check the mechanisms that keep the
loop free, with fleets small enough for a test run; bench/router_fleet.py measures 10,000.
"""
from __future__ import annotations

import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from harness import async_wait_for
from infinilm_svc.config.router import RouterConfig
from infinilm_svc.looplag import LoopLag
from infinilm_svc.router.app import DISCOVERY, HEALTH, TABLE, create_app
from infinilm_svc.router.balancer import Session
from infinilm_svc.router.metrics import SLICE, Exposition
from infinilm_svc.router.stats import Samples
from infinilm_svc.runtime import HostedApp, start_app
from router_harness import HOST, Deployment, backend_record, dep, router_config  # noqa: F401 - dep is a fixture


def fleet_records(n: int, port: int) -> list[dict]:
    return [backend_record(f"fleet-{i}", port, ["fleet-model"]) for i in range(n)]


class Ticker:
    """Counts the turns the event loop gets while something else runs."""

    def __init__(self) -> None:
        self.turns = 0
        self.handle: asyncio.Handle | None = None

    def start(self) -> None:
        self.turns += 1
        self.handle = asyncio.get_running_loop().call_soon(self.start)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def test_loop_lag_monitor_measures_a_stall():
    lag = LoopLag(every=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await async_wait_for(lambda: lag.count >= 3, timeout=5, what="a few lag samples")
        time.sleep(0.3)   # a deliberate stall of the event loop, the thing being measured
        await async_wait_for(lambda: lag.max >= 0.25, timeout=5, what="the stall recorded")
        assert lag.recent_max >= 0.25
        hist = lag.histogram()
        assert hist[-1][1] == lag.count and hist[-1][1] - dict(hist)[0.25] >= 1, "the stall is in a bucket over 0.25 s"
    finally:
        task.cancel()


async def test_a_slow_full_collection_freezes_what_survived_it():
    lag = LoopLag()
    lag.FREEZE_AFTER = 0.0      # any full collection counts as slow here
    task = asyncio.create_task(lag.run())
    try:
        await async_wait_for(lambda: lag.count >= 1, timeout=5, what="the monitor running")
        gc.collect()
        await async_wait_for(lambda: lag.gc_frozen > 0, timeout=5, what="objects frozen after a full collection")
        assert lag.gc_full >= 1 and lag.to_json()["gc_full_collections"] >= 1
    finally:
        task.cancel()
        gc.unfreeze()


async def test_metrics_are_written_in_slices_with_the_loop_free_between():
    """Before: the whole exposition was one blocking call (0 turns for anything else)."""
    app = create_app(RouterConfig(port=1, registry_url="http://127.0.0.1:9"))
    n = 1000
    app[DISCOVERY].apply(fleet_records(n, 9))
    table = app[TABLE]
    for i, b in enumerate(table.backends.values()):
        b.stats.request_count = i
        b.stats.latency.add(0.02)
    lag = LoopLag()
    ticker = Ticker()
    ticker.start()
    chunks = [c async for c in Exposition(table, app[HEALTH], lag).chunks()]
    ticker.stop()
    per_backend_families = 9
    assert ticker.turns >= per_backend_families * n // SLICE, "the loop ran between slices"
    text = b"".join(chunks).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("infinilm_router_backend_requests_total", (("backend", "fleet-7"),))] == 7
    assert samples[("infinilm_router_backend_latency_seconds_count", (("backend", "fleet-7"),))] == 1
    assert samples[("infinilm_router_backend_latency_seconds_bucket", (("backend", "fleet-7"), ("le", "0.025")))] == 1
    assert samples[("infinilm_router_backend_routable", (("backend", "fleet-999"),))] == 1
    assert ("infinilm_router_event_loop_lag_max_seconds", ()) in samples
    assert samples[("infinilm_router_health_check_interval_seconds", ())] == max(5.0, n / 30.0)


async def test_registry_table_applied_in_slices(monkeypatch):
    """The loop gets a turn whenever a slice's time is up (0 here: after every step of records)."""
    from infinilm_svc.router import discovery
    monkeypatch.setattr(discovery, "SLICE_SECONDS", 0.0)
    app = create_app(RouterConfig(port=1, registry_url="http://127.0.0.1:9"))
    ticker = Ticker()
    ticker.start()
    try:
        await app[DISCOVERY].apply_in_slices(fleet_records(2000, 9))
    finally:
        ticker.stop()
        gc.unfreeze()
    assert len(app[TABLE].backends) == 2000 and app[TABLE].routable_count == 2000
    assert ticker.turns >= 2000 // discovery.STEP


async def test_a_fleet_taken_in_is_moved_out_of_the_collectors_sight():
    """Before: every backend's objects stayed in the collector's generations, so the full
    collections set off as the heap grew walked the whole fleet again and again (8 of them, up to
    90 ms each with the loop stopped, taking in 10,000 backends)."""
    app = create_app(RouterConfig(port=1, registry_url="http://127.0.0.1:9"))
    try:
        await app[DISCOVERY].apply_in_slices(fleet_records(1000, 9))
        backends = list(app[TABLE].backends.values())
        seen = {id(o) for o in gc.get_objects()}       # what the collector still walks
        assert len(backends) == 1000
        walked = [b.name for b in backends if id(b) in seen or id(b.stats) in seen]
        assert not walked, f"{len(walked)} of 1000 backends still walked by every full collection"
    finally:
        gc.unfreeze()


async def test_a_router_freezes_what_it_holds_once_it_serves(dep, procs, tmp_path, pyz_path):
    """The program's modules, config and apps live as long as the process; frozen at start, no
    full collection walks them (37,000 objects, about 20 ms of every full collection). Before: 0
    frozen until a collection had been slow."""
    import sys

    from harness import free_port, write_toml
    port = free_port()
    cfg = write_toml(tmp_path / "router.toml", {"router": {
        "bind": HOST, "port": port, "registry_url": dep.registry_url, "access_log": False}})
    procs.start([sys.executable, str(pyz_path), "--config", str(cfg)], name="router")

    async def health() -> dict | None:
        try:
            async with dep.session.get(f"http://{HOST}:{port}/health") as r:
                return await r.json()
        except aiohttp.ClientError:
            return None
    await async_wait_for(health, timeout=20, what="the router answering")
    lag = (await health())["event_loop_lag"]
    assert lag["gc_frozen_objects"] > 10_000, lag


async def test_session_ring_is_bounded_for_a_large_group():
    """Before: 64 points per backend, 640,000 for 10,000 backends, about 14 s per rebuild."""
    app = create_app(RouterConfig(port=1, registry_url="http://127.0.0.1:9", policy="session"))
    app[DISCOVERY].apply(fleet_records(3000, 9))
    group = app[TABLE].groups[("fleet-model", None)]
    assert Session.MAX_POINTS >= len(group.state.hashes) >= 3000
    assert group.state.hashes == sorted(group.state.hashes)


def test_latency_window_is_invisible_to_the_garbage_collector():
    s = Samples()
    for i in range(2000):
        s.add(i / 1000)
    assert len(gc.get_referents(s.buf)) <= 1, \
        "a list of floats per backend made each full collection walk 2,048 references per backend"
    assert s.percentiles_ms()["p50"] is not None and len(s.buf) == 1024


async def test_stats_and_services_stream_whole_json(dep):
    port = await dep.start_mock("real", ["fleet-model"])
    for rec in fleet_records(600, port):
        await dep.registry.register(rec)
    await dep.start_router(health_interval=30.0)
    await dep.wait_routable(601)
    status, stats, headers = await dep.get("/stats")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert stats["total_services"] == 601 and len(stats["services"]) == 601
    assert stats["event_loop_lag"]["samples"] >= 0 and "models" in stats
    status, services, _ = await dep.get("/services")
    assert services["total"] == 601 and len(services["services"]) == 601 and services["registry_url"]
    _, health, _ = await dep.get("/health")
    assert "max_ms" in health["event_loop_lag"]


async def test_health_checks_are_spread_and_bounded():
    """300 backends, at most 100 checks a second and 4 at once. Before: all 300 checked at once at
    the start of every pass, up to 64 in flight."""
    state = {"open": 0, "max_open": 0, "checks": 0}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["open"] += 1
        state["max_open"] = max(state["max_open"], state["open"])
        state["checks"] += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            await reader.read()      # until the router closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            state["open"] -= 1
            writer.close()

    server = await asyncio.start_server(answer, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    d = Deployment(None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            static = Path(tmp) / "services.json"
            static.write_text(json.dumps({"services": [
                {"name": f"fleet-{i}", "host": HOST, "port": port, "url": f"http://{HOST}:{port}",
                 "metadata": {"models": ["fleet-model"]}} for i in range(300)]}))
            cfg = router_config(None, static_services=str(static), health_interval=1.0, health_max_rate=100.0,
                                health_concurrency=4)
            started = time.monotonic()
            d.router_app = create_app(cfg)
            d.runners.append(await start_app(HostedApp("router", "router", d.router_app, HOST, cfg.port)))
            health = d.router_app[HEALTH]
            await async_wait_for(lambda: state["checks"] >= 300, timeout=30, what="every backend checked")
            elapsed = time.monotonic() - started
            # The budget is a token bucket of 100 a second (burst 10): an upper bound however slow
            # the machine is, since `elapsed` is at least the router's own time.
            assert state["checks"] <= 100 * elapsed + 10 + 4, (state["checks"], elapsed)
            assert state["max_open"] <= 4
            assert health.effective_interval == 3.0
            assert health.checks[1] >= 296 and health.checks[0] == 0
    finally:
        await d.close()
        server.close()
        await server.wait_closed()


async def test_an_unchanged_registry_table_is_not_sent_again(dep):
    """A watch that times out with nothing changed: 304 and no body, not the whole table again
    (2.5 MB for 10,000 records, parsed with the router's loop stopped, every watch_wait)."""
    for rec in fleet_records(3, 9):
        await dep.registry.register(rec)
    records, index, etag = await dep.registry.watch_services(0, None)
    assert len(records) == 3 and etag
    again, index2, etag2 = await dep.registry.watch_services(index, 0.2, etag)
    assert again is None and index2 == index and etag2 == etag
    await dep.registry.register(backend_record("fleet-new", 9, ["fleet-model"]))
    changed, index3, etag3 = await dep.registry.watch_services(index, 5.0, etag)
    assert changed is not None and len(changed) == 4 and index3 > index and etag3 != etag


async def test_a_registry_table_is_decoded_in_slices():
    """2.5 MB of records in one json.loads held the router's loop for 40-80 ms on this machine."""
    from infinilm_svc.client.registry import records_in_slices
    from infinilm_svc.wire import dumps
    records = fleet_records(1000, 9)
    records[3]["metadata"]["note"] = 'a "quoted" ] and , inside'
    text = dumps({"services": records, "total": 1000, "index": 7})
    ticker = Ticker()
    ticker.start()
    got = await records_in_slices(text)
    ticker.stop()
    assert got == records and ticker.turns >= 3
    assert await records_in_slices(json.dumps({"total": 0, "services": records[:2]})) == records[:2]
    assert await records_in_slices('{"services":[ ]}') == []
    for cut in ('{"services":[{"name":"a"},', '{"services":[{"name":"a"'):
        try:
            await records_in_slices(cut)
        except ValueError:
            continue
        raise AssertionError(f"a cut answer was taken: {cut!r}")
