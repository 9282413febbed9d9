"""Overload: requests beyond an engine's capacity wait at the router, in priority order and fair
between tenants; what does not fit is told when to come back; a client that leaves while waiting
never reaches an engine."""
from __future__ import annotations

import asyncio

from harness import async_wait_for
from router_harness import dep  # noqa: F401 - the fixture


def chat_body(i: int, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 4, **extra}


ADMIN: dict[str, str] = {}      # the key /stats needs, when a test sets api_keys


async def queue_of(dep, model: str = "m") -> dict:
    _, stats, _ = await dep.get("/stats", headers=ADMIN)
    return stats["queues"].get(model, {"waiting": 0, "tenants": {}})


async def one_engine(dep, slots: int = 1, latency: float = 0.3, **router) -> None:
    """One mock engine reporting `slots` slots (as a babysitter puts it in the record)."""
    port = await dep.start_mock("e", ["m"], register=False, latency=latency)
    await dep.register("e", port, ["m"], total_slots=slots)
    await dep.start_router(**router)
    await dep.wait_routable(1)


class Clients:
    """Requests sent one after the other once the previous one is queued; their completion order."""

    def __init__(self, dep) -> None:
        self.dep = dep
        self.done: list[str] = []
        self.tasks: list[asyncio.Task] = []

    async def send(self, label: str, body: dict, headers: dict | None = None, queued: int | None = None) -> None:
        async def go():
            status, data, hdrs = await self.dep.post("/v1/chat/completions", body, headers=headers or {})
            self.done.append(label if status == 200 else f"{label}:{status}")
            return status, data, hdrs
        self.tasks.append(asyncio.create_task(go()))
        if queued is not None:
            await async_wait_for(lambda: self._waiting(queued), timeout=10, what=f"{queued} waiting")

    async def _waiting(self, n: int) -> bool:
        return (await queue_of(self.dep))["waiting"] >= n

    async def results(self) -> list:
        return await asyncio.gather(*self.tasks)


async def test_an_engine_runs_only_as_many_requests_as_its_slots_the_rest_wait_at_the_router(dep):
    await one_engine(dep, slots=2)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch():
        while not stop.is_set():
            _, stats, _ = await dep.get("/stats")
            seen.append(stats["services"][0]["in_flight"])
            await asyncio.sleep(0.02)
    watcher = asyncio.create_task(watch())
    c = Clients(dep)
    for i in range(6):
        await c.send(str(i), chat_body(i))
    results = await c.results()
    stop.set()
    await watcher
    assert all(r[0] == 200 for r in results)
    assert max(seen) == 2, f"the engine had {max(seen)} requests at once with 2 slots"
    q = await queue_of(dep)
    assert q["capacity"] == 2 and q["dispatched_from_queue"] >= 3


async def test_a_per_backend_capacity_overrides_what_the_engine_says(dep):
    await one_engine(dep, slots=4, backend_capacity={"e": 1})
    c = Clients(dep)
    await c.send("first", chat_body(0))
    await c.send("second", chat_body(1), queued=1)      # waits: one place, taken
    await c.results()
    assert (await queue_of(dep))["capacity"] == 1


async def test_waiting_requests_go_in_class_order_priority_default_flex(dep):
    await one_engine(dep)
    c = Clients(dep)
    await c.send("holder", chat_body(0))
    await async_wait_for(lambda: _in_flight(dep, 1), timeout=10, what="the place taken")
    await c.send("flex", chat_body(1, service_tier="flex"), queued=1)
    await c.send("default", chat_body(2), queued=2)
    await c.send("priority", chat_body(3), headers={"X-Service-Tier": "priority"}, queued=3)
    await c.results()
    assert c.done == ["holder", "priority", "default", "flex"]


async def _in_flight(dep, n: int) -> bool:
    _, stats, _ = await dep.get("/stats", headers=ADMIN)
    return stats["services"][0]["in_flight"] >= n


async def test_two_tenants_flooding_share_the_engine_turn_about(dep):
    await one_engine(dep, latency=0.5)
    c = Clients(dep)
    await c.send("hold", chat_body(0, user="z"))
    await async_wait_for(lambda: _in_flight(dep, 1), timeout=10, what="the place taken")
    for i in range(6):                  # x asks six times, then y six times
        await c.send("x", chat_body(10 + i, user="x"))
    await async_wait_for(lambda: _waiting_now(dep, 6), timeout=10, what="x's six queued")
    for i in range(6):
        await c.send("y", chat_body(20 + i, user="y"))
    await async_wait_for(lambda: _waiting_now(dep, 12), timeout=10, what="y's six queued")
    await c.results()
    order = c.done[1:]
    assert sorted(order) == ["x"] * 6 + ["y"] * 6
    first = order[:6]
    assert first.count("x") == 3 and first.count("y") == 3, order
    tenants = (await queue_of(dep))["tenants"]
    assert tenants["user:x"]["admitted"] == tenants["user:y"]["admitted"] == 6
    async with dep.session.get(dep.router_url + "/metrics") as r:
        metrics = await r.text()
    assert 'infinilm_router_queue_admitted_total{model="m",tenant="user:x"} 6.0' in metrics
    assert 'infinilm_router_queue_wait_seconds_count{model="m",class="default"} 12.0' in metrics


async def test_a_tenant_over_its_share_gets_429_with_a_retry_after_others_are_queued(dep):
    await one_engine(dep, latency=0.5, queue_size=4)
    c = Clients(dep)
    await c.send("hold", chat_body(0, user="x"))
    await async_wait_for(lambda: _in_flight(dep, 1), timeout=10, what="the place taken")
    for i in range(4):
        await c.send("x", chat_body(10 + i, user="x"))
    await async_wait_for(lambda: _waiting_now(dep, 4), timeout=10, what="x's four queued")
    # x holds the whole queue; one more from x is refused, with when to come back.
    status, data, headers = await dep.post("/v1/chat/completions", chat_body(99, user="x"))
    assert status == 429 and data["error"]["code"] == "queue_full"
    after = int(headers["Retry-After"])
    assert after >= 1 and f"retry after {after} s" in data["error"]["message"]
    # y is under its share: it takes the place of x's newest request, which is told to come back.
    await c.send("y", chat_body(50, user="y"))
    results = await c.results()
    refused = [r for r in results if r[0] == 429]
    assert len(refused) == 1 and refused[0][2].get("Retry-After")
    assert "y" in c.done
    # The refused request, sent again once its Retry-After has passed, is queued and served.
    loop = asyncio.get_running_loop()
    told = loop.time()
    await async_wait_for(lambda: loop.time() - told >= after, timeout=after + 10, what="the Retry-After to pass")
    status, data, _ = await dep.post("/v1/chat/completions", chat_body(99, user="x"))
    assert status == 200, data


async def test_an_unknown_service_tier_is_refused_naming_the_allowed_ones(dep):
    await one_engine(dep, latency=0.0)
    status, data, _ = await dep.post("/v1/chat/completions", chat_body(0, service_tier="gold"))
    assert status == 400 and data["error"]["code"] == "invalid_service_tier"
    assert "auto, default, flex, priority, scale" in data["error"]["message"]
    status, data, _ = await dep.post("/v1/chat/completions", chat_body(0), headers={"X-Service-Tier": "urgent"})
    assert status == 400 and "X-Service-Tier" in data["error"]["message"]


async def test_with_api_keys_only_an_allowed_key_may_ask_for_priority(dep):
    await one_engine(dep, latency=0.5, api_keys=("k-plain", "k-ops"), priority_keys=("k-ops",))
    ADMIN["Authorization"] = "Bearer k-ops"
    try:
        c = Clients(dep)
        plain = {"Authorization": "Bearer k-plain"}
        ops = {"Authorization": "Bearer k-ops"}
        await c.send("hold", chat_body(0), headers=plain)
        await async_wait_for(lambda: _in_flight(dep, 1), timeout=10, what="the place taken")
        await c.send("ops-default", chat_body(1), headers=ops, queued=1)
        await c.send("plain-asks-priority", chat_body(2, service_tier="priority"), headers=plain, queued=2)
        await c.send("ops-priority", chat_body(3, service_tier="priority"), headers=ops, queued=3)
        await c.results()
    finally:
        ADMIN.clear()
    # The plain key's priority is served as default: after ops' earlier default request.
    assert c.done == ["hold", "ops-priority", "ops-default", "plain-asks-priority"]


async def test_a_client_that_leaves_while_queued_never_reaches_the_engine(dep):
    await one_engine(dep, latency=0.5)
    c = Clients(dep)
    await c.send("hold", chat_body(0))
    await async_wait_for(lambda: _in_flight(dep, 1), timeout=10, what="the place taken")
    leaving = asyncio.create_task(dep.post("/v1/chat/completions", chat_body(1)))
    await async_wait_for(lambda: _waiting_now(dep, 1), timeout=10, what="the second request queued")
    leaving.cancel()
    await async_wait_for(lambda: _cancelled(dep), timeout=10, what="the queued request cancelled")
    await c.results()
    _, stats, _ = await dep.get("/stats")
    assert stats["services"][0]["request_count"] == 1     # only the first reached the engine


async def _waiting_now(dep, n: int) -> bool:
    return (await queue_of(dep))["waiting"] == n


async def _cancelled(dep) -> bool:
    q = await queue_of(dep)
    return q["cancelled"] == 1 and q["waiting"] == 0
