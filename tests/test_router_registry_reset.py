"""A registry that restarts empty (no state file) does not empty the router: the backends it
knew stay routable for a grace period, until they register again or it passes."""
from __future__ import annotations

import asyncio

import aiohttp

from harness import async_wait_for
from infinilm_svc.config.registry import RegistryConfig
from infinilm_svc.registry.app import create_app as create_registry
from router_harness import HOST, dep  # noqa: F401 (a fixture)


async def test_a_registry_restarted_empty_costs_no_request(dep):
    port_a = await dep.start_mock("a", ["m"])
    await dep.start_mock("b", ["m"])
    await dep.start_router(watch_wait=1.0)
    await dep.wait_routable(2)
    results: list = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(dep.router_url + "/v1/chat/completions",
                                  json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:
                    await r.read()
                    results.append(r.status)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await async_wait_for(lambda: len(results) > 20, timeout=10, what="load flowing")
        _, h, _ = await dep.get("/health")
        old_index = h["registry"]["index"]
        port = dep.registry_server.port
        await dep.registry_server.close()                       # the registry dies...
        cfg = RegistryConfig(bind=HOST, port=port, sweep_interval=0.1, probe_interval=0)
        dep.registry_server = await dep.aiohttp_server(create_registry(cfg), host=HOST, port=port)  # ...and comes back empty

        async def resynced():
            _, h, _ = await dep.get("/health")
            return h["registry"]["reachable"] and h["registry"]["index"] < old_index
        await async_wait_for(resynced, timeout=15, what="the router to read the restarted registry")
        n = len(results)
        await async_wait_for(lambda: len(results) > n + 50, timeout=10, what="load after the restart")
        _, h, _ = await dep.get("/health")
        assert h["healthy_services"] == "2/2", h
        await dep.register("a", port_a, ["m"])                  # a comes back on its own
    finally:
        stop.set()
        await asyncio.gather(*clients)
    failed = [s for s in results if s != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed"

