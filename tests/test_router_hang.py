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


@pytest.mark.parametrize("how", ["hang-after", "sigstop"])
async def test_a_hung_backend_is_taken_out_and_its_held_requests_go_elsewhere(dep, procs, how):
    knobs = ("--hang-after", "40") if how == "hang-after" else ()
    _, proc_a = await start_mock_process(dep, procs, "a", ["m"], *knobs)
    await start_mock_process(dep, procs, "b", ["m"])
    await dep.start_router(**DEFAULTS)
    await dep.wait_routable(2)
    stop, results = asyncio.Event(), []
    clients = [asyncio.create_task(_load(dep, stop, results)) for _ in range(8)]
    try:
        await async_wait_for(lambda: len(results) >= 20, timeout=20, what="load flowing")
        if how == "sigstop":
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
        if how == "sigstop":
            os.kill(proc_a.pid, signal.SIGCONT)
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    print(f"{len(results)} requests, slowest {max(t for _, t in results):.2f}s")

