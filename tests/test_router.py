"""Router behaviour over real sockets: policies, local endpoints and error answers."""
from __future__ import annotations

import asyncio
from itertools import pairwise

from harness import async_wait_for
from router_harness import Deployment, dep  # noqa: F401 (dep: a fixture)


async def test_round_robin_alternates_per_model(dep):
    """Interleaved requests for two models still alternate backends within each model."""
    for name in ("a", "b"):
        await dep.start_mock(name, ["m1", "m2"])
    await dep.start_router(policy="round_robin")
    await dep.wait_routable(2)
    seen = {"m1": [], "m2": []}
    for _ in range(6):
        for model in ("m1", "m2"):
            seen[model].append(await dep.chat(model))
    for model, seq in seen.items():
        assert all(x != y for x, y in pairwise(seq)), f"{model}: {seq}"
        assert set(seq) == {"a", "b"}


async def test_session_keys_stick_and_only_removed_backends_keys_move(dep):
    """Consistent hashing: a key keeps its backend; removing one backend moves only its keys."""
    for name in ("a", "b", "c"):
        await dep.start_mock(name, ["m"])
    await dep.start_router(policy="session")
    await dep.wait_routable(3)
    keys = [f"conv-{i}" for i in range(24)]
    first = {k: await dep.chat("m", prompt_cache_key=k) for k in keys}
    assert len(set(first.values())) == 3, first
    again = {k: await dep.chat("m", prompt_cache_key=k) for k in keys}
    assert again == first
    # The header and the `user` field are keys too.
    assert await dep.chat("m", user="alice") == await dep.chat("m", user="alice")
    status, data, _ = await dep.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                     headers={"X-Session-ID": "conv-3"})
    assert status == 200 and f"Hello from {first['conv-3']}" in data["choices"][0]["message"]["content"]
    await dep.registry.deregister("b")
    await dep.wait_routable(2)
    after = {k: await dep.chat("m", prompt_cache_key=k) for k in keys}
    for k in keys:
        if first[k] != "b":
            assert after[k] == first[k], f"{k} moved from {first[k]} to {after[k]}"
        else:
            assert after[k] in ("a", "c")


async def test_cache_aware_sends_shared_prefixes_to_one_backend(dep):
    for name in ("a", "b", "c"):
        await dep.start_mock(name, ["m"])
    await dep.start_router(policy="cache_aware", cache_min_match=64)
    await dep.wait_routable(3)
    prefixes = ["You are a careful assistant. " * 20, "Translate the following legal text. " * 20]
    for p in prefixes:
        where = {await dep.chat("m", p + f" question {i}") for i in range(8)}
        assert len(where) == 1, f"prefix family spread over {where}"
    unrelated = {await dep.chat("m", f"{i} unrelated short prompt") for i in range(6)}
    assert len(unrelated) >= 2, "prompts without a shared prefix should spread by load"


async def test_least_requests_avoids_a_slow_backend(dep):
    await dep.start_mock("slow", ["m"], latency=0.5)
    await dep.start_mock("fast", ["m"])
    await dep.start_router(policy="least_requests")
    await dep.wait_routable(2)
    counts = {"slow": 0, "fast": 0}
    queue = asyncio.Queue()
    for i in range(60):
        queue.put_nowait(i)

    async def client():
        while not queue.empty():
            queue.get_nowait()
            counts[await dep.chat("m")] += 1
    await asyncio.gather(*(client() for _ in range(8)))
    assert counts["fast"] + counts["slow"] == 60
    assert counts["slow"] <= 15, counts  # round robin would send it 30


async def test_weighted_follows_record_weights(dep):
    """metadata.weight 3:1 gives exactly 3:1 of the picks."""
    ph = await dep.start_mock("h", ["m"], register=False)
    pl = await dep.start_mock("l", ["m"], register=False)
    await dep.register("h", ph, ["m"], weight=3)
    await dep.register("l", pl, ["m"], weight=1)
    await dep.start_router(policy="weighted")
    await dep.wait_routable(2)
    got = [await dep.chat("m") for _ in range(40)]
    assert got.count("h") == 30 and got.count("l") == 10, got


async def test_power_of_two_uses_every_backend(dep):
    for name in ("a", "b", "c"):
        await dep.start_mock(name, ["m"])
    await dep.start_router(policy="power_of_two")
    await dep.wait_routable(3)
    assert {await dep.chat("m") for _ in range(30)} == {"a", "b", "c"}


async def test_cache_type_pools_route_by_message_size(dep):
    ps = await dep.start_mock("static-1", ["m"], register=False)
    pp = await dep.start_mock("paged-1", ["m"], register=False)
    await dep.register("static-1", ps, ["m"], cache_type="static")
    await dep.register("paged-1", pp, ["m"], cache_type="paged")
    await dep.start_router(cache_type_threshold=1000)
    await dep.wait_routable(2)
    assert {await dep.chat("m", "short") for _ in range(4)} == {"paged-1"}
    assert {await dep.chat("m", "x" * 2000) for _ in range(4)} == {"static-1"}


async def test_error_answers(dep):
    """404 unknown model, 503 + Retry-After without a healthy backend, 400 bad JSON, 413 too big."""
    await dep.start_mock("a", ["m"])
    await dep.register("sleepy", 9, ["starting-model"], status="starting")
    await dep.start_router(max_body=4096)
    await dep.wait_routable(1, total=2)
    status, data, headers = await dep.post("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
                                           headers={"X-Request-ID": "r-404"})
    assert status == 404 and data["error"]["code"] == "model_not_found"
    assert headers["X-Request-ID"] == "r-404"
    status, data, headers = await dep.post("/v1/chat/completions",
                                           {"model": "starting-model", "messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and headers.get("Retry-After"), (status, data)
    assert data["error"]["type"] == "server_error"
    status, data, _ = await dep.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and data["error"]["code"] == "invalid_json"
    status, data, _ = await dep.post("/v1/chat/completions",
                                     {"model": "m", "messages": [{"role": "user", "content": "y" * 8000}]})
    assert status == 413 and data["error"]["code"] == "body_too_large"


async def test_api_keys_required_and_not_forwarded(dep):
    await dep.start_mock("a", ["m"])
    await dep.start_router(api_keys=("sekret",))
    await dep.wait_routable(1)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    status, data, _ = await dep.post("/v1/chat/completions", body)
    assert status == 401 and data["error"]["code"] == "invalid_api_key"
    status, _, _ = await dep.post("/v1/chat/completions", body, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, _, _ = await dep.get("/v1/models")
    assert status == 401
    status, data, headers = await dep.post("/v1/chat/completions", body, headers={"Authorization": "Bearer sekret",
                                                                                "X-Request-ID": "rid-42"})
    assert status == 200 and headers["X-Request-ID"] == "rid-42"


async def test_v1_models_is_aggregated_and_deduplicated(dep):
    await dep.start_mock("a", ["alpha", "beta"])
    await dep.start_mock("b", ["beta", "gamma"])
    await dep.register("down", 9, ["delta"], status="stopped")
    await dep.start_router()
    await dep.wait_routable(2, total=3)
    for path in ("/v1/models", "/models"):
        status, data, _ = await dep.get(path)
        assert status == 200 and data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["alpha", "beta", "gamma"]


async def test_registry_not_running_removes_backend_at_once(dep):
    await dep.start_mock("a", ["m"])
    await dep.start_mock("b", ["m"])
    await dep.start_router()
    await dep.wait_routable(2)
    await dep.registry.heartbeat("b", status="stopping")
    await dep.wait_routable(1, total=2)
    assert {await dep.chat("m") for _ in range(6)} == {"a"}
    await dep.registry.heartbeat("b", status="running")
    await dep.wait_routable(2)
    assert {await dep.chat("m") for _ in range(6)} == {"a", "b"}


async def test_local_endpoints_and_self_registration(dep):
    await dep.start_mock("a", ["m"])
    await dep.start_router()
    await dep.wait_routable(1)
    for _ in range(3):
        await dep.chat("m")
    status, stats, _ = await dep.get("/stats")
    assert status == 200 and stats["total_services"] == 1 and stats["healthy_services"] == 1
    svc = stats["services"][0]
    assert svc["name"] == "a" and svc["request_count"] == 3 and svc["in_flight"] == 0
    assert svc["latency_ms"]["p50"] is not None and svc["tokens"]["completion"] > 0
    assert stats["models"]["m"]["request_count"] == 3
    before = svc["tokens"]["completion"]
    async with dep.session.post(dep.router_url + "/v1/chat/completions",
                                json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert b"[DONE]" in await r.read()
    _, stats, _ = await dep.get("/stats")
    assert stats["services"][0]["tokens"]["completion"] > before, "usage in a streamed chunk is counted"
    status, services, _ = await dep.get("/services")
    assert services["total"] == 1 and services["services"][0]["url"].startswith("http://127.0.0.1:")
    async with dep.session.get(dep.router_url + "/metrics") as r:
        text = await r.text()
    assert 'infinilm_router_backend_requests_total{backend="a"} 4.0' in text
    records, _ = await dep.registry.services()
    routers = [r for r in records if r["metadata"].get("type") == "router"]
    assert routers and routers[0]["metadata"]["url"] == dep.router_url


async def test_registry_unreachable_keeps_last_table(aiohttp_server):
    d = Deployment(aiohttp_server)
    try:
        await d.start_registry()
        await d.start_mock("a", ["m"])
        # A short long-poll: the router notices a registry gone at its next watch, not 5 s later.
        await d.start_router(watch_wait=0.5)
        await d.wait_routable(1)
        await d.registry_server.close()  # the registry goes away

        async def stale():
            _, h, _ = await d.get("/health")
            return h if not h["registry"]["reachable"] else None
        h = await async_wait_for(stale, timeout=15, what="registry marked unreachable")
        assert h["healthy_services"] == "1/1" and "registry unreachable" in h["message"]
        assert await d.chat("m") == "a"
    finally:
        await d.close()



async def test_503_from_a_backend_is_retried_on_another(dep, aiohttp_server):
    """A backend answering 503 before any byte reached the client: the client gets another's answer."""
    from aiohttp import web

    from harness import free_port
    from router_harness import HOST

    async def overloaded(request):
        return web.json_response({"error": {"message": "busy"}}, status=503)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", overloaded)
    port = free_port()
    await aiohttp_server(app, host=HOST, port=port)
    await dep.register("busy", port, ["m"])
    await dep.start_mock("ok", ["m"])
    await dep.start_router(policy="round_robin", retries=1, eject_cooldown=30)
    await dep.wait_routable(2)
    assert [await dep.chat("m") for _ in range(4)] == ["ok"] * 4
    _, stats, _ = await dep.get("/stats")
    busy = [s for s in stats["services"] if s["name"] == "busy"][0]
    assert busy["errors"].get("http_503", 0) >= 1


async def test_max_in_flight_queues_then_answers_429(dep, aiohttp_server):
    """One slot per backend and a queue of one: of three concurrent requests one is served, one waits
    and the third is refused with 429; the one that waited is served when the slot frees."""
    from aiohttp import web

    from router_harness import HOST

    release = asyncio.Event()

    async def held(request):  # holds every request until the test lets go: no race with the clock
        await release.wait()
        return web.json_response({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello from held"}}]})
    app = web.Application()
    app.router.add_post("/v1/chat/completions", held)
    server = await aiohttp_server(app, host=HOST)
    await dep.register("held", server.port, ["m"])
    await dep.start_router(max_in_flight=1, queue_size=1, queue_timeout=60)
    await dep.wait_routable(1)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    tasks = [asyncio.create_task(dep.post("/v1/chat/completions", body)) for _ in range(3)]
    refused = await async_wait_for(lambda: [t.result() for t in tasks if t.done()], timeout=30,
                                   what="one of three requests to be refused")
    assert len(refused) == 1 and refused[0][0] == 429, refused
    assert refused[0][2].get("Retry-After") and refused[0][1]["error"]["code"] == "queue_full"
    release.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r[0] for r in results) == [200, 200, 429], results


async def test_access_log_has_one_line_per_request(dep, caplog):
    import logging
    await dep.start_mock("a", ["m"])
    await dep.start_router(access_log=True)
    await dep.wait_routable(1)
    with caplog.at_level(logging.INFO, logger="infinilm_svc.router.access"):
        status, _, _ = await dep.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                      headers={"X-Request-ID": "req-7"})
    lines = [r.getMessage() for r in caplog.records if r.name == "infinilm_svc.router.access"]
    assert status == 200 and len(lines) == 1
    assert "id=req-7" in lines[0] and "model=m" in lines[0] and "backend=a" in lines[0] and "status=200" in lines[0]


async def test_when_every_backend_is_ejected_they_are_still_tried(dep):
    """Panic mode: the circuit breaker never turns a model's only backend into a router-made 503."""
    await dep.start_mock("flaky", ["m"], fail_rate=1.0)
    await dep.start_router(eject_cooldown=30)
    await dep.wait_routable(1)
    for _ in range(3):
        status, data, _ = await dep.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert status == 500 and "injected failure on flaky" in data["error"]["message"]
    _, stats, _ = await dep.get("/stats")
    assert stats["services"][0]["circuit"] == "open"


async def test_wildcard_bind_registers_the_address_the_registry_saw(dep):
    from infinilm_svc.router.discovery import router_record
    from router_harness import router_config
    cfg = router_config(dep.registry_url, bind="0.0.0.0")
    rec = router_record(cfg)
    assert rec["host"] == "0.0.0.0" and rec["metadata"]["url"] is None and not rec["name"].startswith("router-0.0.0.0")
    await dep.start_router(bind="0.0.0.0", port=cfg.port, name="wild-router")

    async def registered():
        got = await dep.registry.get("wild-router")
        return got if got and got["metadata"].get("url") else None
    got = await async_wait_for(registered, what="the router's record with its URL")
    assert got["metadata"]["url"] == f"http://127.0.0.1:{cfg.port}" and got["host"] == "127.0.0.1"


async def test_access_log_batch_writes_one_formatted_line_per_request():
    """Through a plain stream handler, lines of one loop turn are written together, each with every field."""
    import io
    import logging

    from infinilm_svc.router.access import AccessLog
    logger = logging.getLogger("test.router.access.batch")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        access = AccessLog(logger)
        access.add("r-1", "m", "a", 200, 0.0123, 0.0045, 17)
        access.add("r-2", "", "", 0, 0.001, None, 0)
        assert stream.getvalue() == ""
        async def two_lines() -> bool:
            return stream.getvalue().count("\n") == 2

        await async_wait_for(two_lines, what="two access lines")
        assert stream.getvalue().splitlines() == [
            "INFO test.router.access.batch: id=r-1 model=m backend=a status=200 latency_ms=12.3 ttfb_ms=4.5 bytes=17",
            "INFO test.router.access.batch: id=r-2 model=- backend=- status=- latency_ms=1.0 ttfb_ms=- bytes=0"]
    finally:
        logger.removeHandler(handler)


async def test_an_unexpected_error_is_answered_in_the_envelope_on_every_route(dep):
    """Each route carries the error envelope itself (no app middleware): a bug in the proxy path
    or in a local endpoint still answers a JSON 500, not aiohttp's bare error page."""
    from infinilm_svc.router.app import PROXY, TABLE
    await dep.start_mock("a", ["m"])
    await dep.start_router()
    await dep.wait_routable(1)
    app = dep.router_app

    async def broken_forward(request, rid):
        raise RuntimeError("boom")

    def broken_health():
        raise RuntimeError("boom")
    app[PROXY]._forward = broken_forward
    app[TABLE].health_json = broken_health
    status, data, _ = await dep.post("/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 500 and data["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                               "code": None}
    status, data, _ = await dep.get("/health")
    assert status == 500 and data["error"]["type"] == "server_error"


async def _open_circuit(dep, name: str) -> dict:
    """Fail requests to `name` until its circuit opens; its /services entry then."""
    async def opened():
        await dep.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
        _, services, _ = await dep.get("/services")
        entry = next(s for s in services["services"] if s["name"] == name)
        return entry if entry["circuit"] == "open" else None
    return await async_wait_for(opened, timeout=10, what=f"{name}'s circuit open")


async def _router_caught_up(dep) -> None:
    """Wait until the router has seen everything the registry holds now."""
    _, index = await dep.registry.services()

    async def seen():
        _, health, _ = await dep.get("/health")
        return health["registry"]["index"] >= index
    await async_wait_for(seen, timeout=10, what=f"the router at registry index {index}")


async def _circuit(dep, name: str) -> str:
    _, services, _ = await dep.get("/services")
    return next(s for s in services["services"] if s["name"] == name)["circuit"]


async def test_a_new_incarnation_of_a_backend_starts_with_a_closed_circuit(dep):
    """A restarted backend (new pid in its record) is not kept out for the old process's cool-down."""
    port = await dep.start_mock("flaky", ["m"], register=False, fail_rate=1.0)
    await dep.register("flaky", port, ["m"], pid=100, restarts=0, started_at=1.0)
    await dep.start_router(eject_cooldown=600)
    await dep.wait_routable(1)
    entry = await _open_circuit(dep, "flaky")
    assert 500 < entry["circuit_retry_in"] <= 600            # /services says how long it stays open
    # A heartbeat from the same process changes nothing: the circuit stays open.
    await dep.registry.heartbeat("flaky", status="running",
                                 metadata={"pid": 100, "restarts": 0, "started_at": 1.0, "note": "same process"})
    await _router_caught_up(dep)
    assert await _circuit(dep, "flaky") == "open"
    # Its babysitter restarted it: new pid and restart count.
    await dep.registry.heartbeat("flaky", status="running", metadata={"pid": 200, "restarts": 1, "started_at": 9.0})

    async def closed():
        return await _circuit(dep, "flaky") == "closed"
    await async_wait_for(closed, timeout=10, what="the circuit of the new incarnation closed")
    _, services, _ = await dep.get("/services")
    entry = services["services"][0]
    assert entry["healthy"] is True and entry["circuit_retry_in"] is None


async def test_back_to_running_after_a_stop_starts_with_a_closed_circuit(dep):
    """Status back to `running` after any other state drops the old verdicts too."""
    port = await dep.start_mock("flaky", ["m"], register=False, fail_rate=1.0)
    await dep.register("flaky", port, ["m"])
    await dep.start_router(eject_cooldown=600)
    await dep.wait_routable(1)
    await _open_circuit(dep, "flaky")
    await dep.registry.heartbeat("flaky", status="stopped")
    await dep.wait_routable(0, total=1)
    await _router_caught_up(dep)
    assert await _circuit(dep, "flaky") == "open"
    await dep.registry.heartbeat("flaky", status="running")
    await dep.wait_routable(1)
    assert await _circuit(dep, "flaky") == "closed"
