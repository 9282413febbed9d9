"""A backend that hangs (accepts, never answers) leaves the routable set quickly, and requests
held by it are sent elsewhere instead of waiting for the read timeout."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from harness import async_wait_for
from infinilm_svc.config.router import RouterConfig
from router_harness import dep  # noqa: F401 (a fixture)
from test_router_proxy import start_mock_process

DEFAULTS = {k: getattr(RouterConfig, k) for k in ("health_interval", "health_timeout", "unhealthy_threshold",
                                                  "healthy_threshold", "read_timeout")}


async def _load(dep, stop: asyncio.Event, results: list) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                async with s.post(dep.router_url + "/v1/chat/completions", json=body) as r:
                    await r.read()
                    results.append((r.status, time.monotonic() - t0))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                results.append((type(exc).__name__, time.monotonic() - t0))


# With scheduled checks 300 s apart, only the out-of-turn probe of a suspected backend can take a
# hung one out within the tests' waits: these runs fail if that probe is not made.
NO_SCHEDULED_CHECKS = {**DEFAULTS, "health_interval": 300.0}


@pytest.mark.parametrize("how", ["hang-after", "sigstop", "sigstop, suspicion only"])
async def test_a_hung_backend_is_taken_out_and_its_held_requests_go_elsewhere(dep, procs, how):
    knobs = ("--hang-after", "40") if how == "hang-after" else ()
    _, proc_a = await start_mock_process(dep, procs, "a", ["m"], *knobs)
    await start_mock_process(dep, procs, "b", ["m"])
    await dep.start_router(**(NO_SCHEDULED_CHECKS if how.endswith("suspicion only") else DEFAULTS))
    await dep.wait_routable(2)
    stop, results = asyncio.Event(), []
    clients = [asyncio.create_task(_load(dep, stop, results)) for _ in range(8)]
    try:
        await async_wait_for(lambda: len(results) >= 20, timeout=20, what="load flowing")
        if how.startswith("sigstop"):
            os.kill(proc_a.pid, signal.SIGSTOP)
        hung_at = time.monotonic()

        async def out_of_rotation():
            _, h, _ = await dep.get("/health")
            return h["healthy_services"] == "1/2"
        await async_wait_for(out_of_rotation, timeout=30, interval=0.05, what="the hung backend out of rotation")
        took = time.monotonic() - hung_at
        print(f"hung backend out of rotation after {took:.2f}s")
        n = len(results)
        await async_wait_for(lambda: len(results) >= n + 40, timeout=20, what="more answers")
    finally:
        stop.set()
        await asyncio.gather(*clients)
        if how.startswith("sigstop"):
            os.kill(proc_a.pid, signal.SIGCONT)
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    print(f"{len(results)} requests, slowest {max(t for _, t in results):.2f}s")



@pytest.mark.parametrize("checks", ["default", "suspicion only"])
async def test_a_stream_under_way_on_a_backend_that_hangs_continues_elsewhere(dep, procs, checks):
    """A stream that had begun when its backend hung (SIGSTOP): the silence makes the router probe
    the backend, and once it is out the stream continues on another backend (request migration).
    Before: only requests with no byte back were moved; a begun stream waited for the babysitter to
    kill the backend (about 9 s in bench/chaos.py) or for read_timeout (600 s)."""
    knobs = ("--chunks", "200", "--chunk-interval", "0.05")
    _, proc_a = await start_mock_process(dep, procs, "a", ["m"], *knobs)
    _, proc_b = await start_mock_process(dep, procs, "b", ["m"], *knobs)
    await dep.start_router(**(NO_SCHEDULED_CHECKS if checks == "suspicion only" else DEFAULTS))
    await dep.wait_routable(2)
    procs_by_name = {"a": proc_a, "b": proc_b}
    stopped = []
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    text = b""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(dep.router_url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            async for piece in r.content.iter_any():
                text += piece
                if not stopped and text.count(b"data: ") >= 5:
                    _, stats, _ = await dep.get("/stats")
                    serving = [sv["name"] for sv in stats["services"] if sv["in_flight"] == 1]
                    assert len(serving) == 1, stats["services"]
                    os.kill(procs_by_name[serving[0]].pid, signal.SIGSTOP)
                    stopped.append((serving[0], time.monotonic()))
    try:
        assert stopped and text.rstrip().endswith(b"data: [DONE]"), text[-300:]
        _, stats, _ = await dep.get("/stats")
        services = {sv["name"]: sv for sv in stats["services"]}
        assert services[stopped[0][0]]["migrations"] == 1, services[stopped[0][0]]
        assert b"upstream_stream_error" not in text
    finally:
        for name, _ in stopped:
            os.kill(procs_by_name[name].pid, signal.SIGCONT)
