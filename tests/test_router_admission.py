"""Every path to a backend goes through its admission: requests, retries and migrations alike."""
from __future__ import annotations

import asyncio

from router_harness import dep  # noqa: F401 - the fixture


async def test_a_migration_waits_for_a_full_backend_instead_of_going_past_max_in_flight(dep):
    # b is the only backend of model n: a slow answer there holds b's one place for 2 s.
    await dep.start_mock("a", ["m"], die_mid_stream_after=2, chunks=8)
    await dep.start_mock("b", ["m", "n"], latency=2.0)
    await dep.start_router(policy="least_requests", max_in_flight=1, queue_timeout=20)
    await dep.wait_routable(2)
    seen: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            _, stats, _ = await dep.get("/stats")
            seen.extend(s["in_flight"] for s in stats["services"] if s["name"] == "b")
            await asyncio.sleep(0.02)

    async def stream(model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with dep.session.post(dep.router_url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            return (await r.read()).decode()

    watcher = asyncio.create_task(watch())
    slow = asyncio.create_task(stream("n"))
    await asyncio.sleep(0.3)          # b has taken the slow request
    moved = await stream("m")         # goes to a, which dies after 2 chunks: continued on b
    await slow
    done.set()
    await watcher
    assert moved.rstrip().endswith("data: [DONE]")
    _, stats, _ = await dep.get("/stats")
    by_name = {s["name"]: s for s in stats["services"]}
    assert by_name["a"]["migrations"] == 1 and by_name["b"]["request_count"] == 2
    assert max(seen) == 1, f"b had {max(seen)} requests in flight with max_in_flight = 1"
