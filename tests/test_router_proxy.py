"""Router forwarding over real sockets: backends dying, streams breaking, clients leaving, the openai SDK."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from harness import async_wait_for, free_port
from router_harness import HOST, Deployment, dep, mock_command, served_by  # noqa: F401 (dep: a fixture)


async def start_mock_process(dep: Deployment, procs, name: str, models: list[str], *knobs: str) -> tuple[int, object]:
    port = free_port()
    proc = procs.start(mock_command(name, port, models, *knobs), name=name)

    async def up():
        try:
            async with dep.session.get(f"http://{HOST}:{port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    await async_wait_for(up, timeout=15, what=f"mock {name} listening")
    await dep.register(name, port, models)
    return port, proc


def established_to(port: int) -> int:
    """TCP connections in this network namespace whose remote end is 127.0.0.1:`port`."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            remote, state = parts[2], parts[3]
            if state == "01" and remote == f"0100007F:{port:04X}":
                n += 1
    return n


async def test_killing_a_backend_under_load_loses_no_request(dep, procs):
    """50 concurrent clients; one of three backends is SIGKILLed mid-run; every request succeeds."""
    victims = {}
    for name in ("a", "b", "c"):
        _, victims[name] = await start_mock_process(dep, procs, name, ["m"], "--latency", "0.02")
    # Passive ejection and retries are under test here; a generous active-check timeout keeps a
    # loaded machine (50 clients share this event loop with the router) from failing a/c's checks.
    await dep.start_router(policy="round_robin", retries=2, health_timeout=5.0)
    await dep.wait_routable(3)
    done = 0
    errors: list = []
    seen: set = set()
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    killed = asyncio.Event()

    async def client():
        nonlocal done
        for _ in range(12):
            async with dep.session.post(dep.router_url + "/v1/chat/completions", json=body) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    errors.append((r.status, data))
                else:
                    seen.add(served_by(data))
            done += 1
            if done == 150:
                os.kill(victims["b"].pid, signal.SIGKILL)
                killed.set()
    await asyncio.gather(*(client() for _ in range(50)))
    assert killed.is_set()
    assert errors == []
    assert seen == {"a", "b", "c"}
    _, stats, _ = await dep.get("/stats")
    b = [s for s in stats["services"] if s["name"] == "b"][0]
    assert b["healthy"] is False and b["error_count"] >= 1, b


async def test_backend_dying_mid_stream_ends_with_an_error_event(dep, procs):
    _, proc = await start_mock_process(dep, procs, "a", ["m"], "--chunks", "200", "--chunk-interval", "0.02")
    await dep.start_router()
    await dep.wait_routable(1)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    received = b""
    async with dep.session.post(dep.router_url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            if not received:
                os.kill(proc.pid, signal.SIGKILL)
            received += chunk
    events = [e for e in received.decode().split("\n\n") if e.strip()]
    assert len(events) >= 2
    assert not any(e.strip() == "data: [DONE]" for e in events)
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_stream_error" and "mid-stream" in last["error"]["message"]


async def test_client_disconnect_closes_the_upstream_connection(dep, procs):
    port, _ = await start_mock_process(dep, procs, "a", ["m"], "--chunks", "2000", "--chunk-interval", "0.02")
    await dep.start_router(health_interval=300)  # no health probes holding connections to the mock
    await dep.wait_routable(1)
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    before = established_to(port)  # the test's own pooled connection from the readiness probe
    client = aiohttp.ClientSession()
    try:
        r = await client.post(dep.router_url + "/v1/chat/completions", json=body)
        assert r.status == 200
        await r.content.readany()
        assert established_to(port) == before + 1
        r.close()  # the client hangs up mid-stream
    finally:
        await client.close()
    await async_wait_for(lambda: established_to(port) == before, timeout=10,
                         what="the router's connection to the backend to close")
    _, stats, _ = await dep.get("/stats")
    assert stats["services"][0]["errors"].get("client_disconnect") == 1
    assert stats["services"][0]["in_flight"] == 0



async def test_openai_sdk_chat_streaming_and_embeddings(dep):
    openai = pytest.importorskip("openai")
    await dep.start_mock("a", ["chat-model", "embed-model"])
    await dep.start_router(api_keys=("k1",))
    await dep.wait_routable(1)
    client = openai.AsyncOpenAI(base_url=dep.router_url + "/v1", api_key="k1", max_retries=0)
    try:
        chat = await client.chat.completions.create(model="chat-model",
                                                    messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content.startswith("Hello from a")
        stream = await client.chat.completions.create(model="chat-model", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello from a (model: chat-model)"
        emb = await client.embeddings.create(model="embed-model", input=["one", "two"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["chat-model", "embed-model"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
        bad = openai.AsyncOpenAI(base_url=dep.router_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
        await bad.close()
    finally:
        await client.close()


async def test_retry_on_503_goes_to_another_backend_and_circuit_ejects(dep, procs):
    """A backend answering 500/503 is ejected by the circuit breaker; answers come from the good one."""
    await dep.start_mock("good", ["m"])
    await dep.start_mock("bad", ["m"], fail_rate=1.0)
    await dep.start_router(policy="round_robin", eject_cooldown=30)
    await dep.wait_routable(2)
    got = [await _chat_status(dep) for _ in range(6)]
    # The first pick of "bad" answers 500 (passed through: not a retry status); it is then ejected.
    assert got.count((200, "good")) >= 5, got
    _, stats, _ = await dep.get("/stats")
    bad = [s for s in stats["services"] if s["name"] == "bad"][0]
    assert bad["circuit"] == "open" and bad["healthy"] is False


async def _chat_status(dep):
    status, data, _ = await dep.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    return status, served_by(data) if status == 200 else data["error"]["message"]


async def test_active_checks_take_a_dead_backend_out_and_bring_it_back(dep, procs):
    """No traffic needed: 3 failed /health checks remove it, 2 good ones after a restart restore it."""
    port, proc = await start_mock_process(dep, procs, "a", ["m"])
    await dep.start_mock("b", ["m"])
    await dep.start_router(health_interval=0.1)
    await dep.wait_routable(2)
    os.kill(proc.pid, signal.SIGKILL)
    await dep.wait_routable(1, total=2)
    _, services, _ = await dep.get("/services")
    a = [s for s in services["services"] if s["name"] == "a"][0]
    assert a["active_healthy"] is False and a["registry_healthy"] is True and a["circuit"] == "closed"
    procs.start(mock_command("a", port, ["m"]), name="a-again")
    await dep.wait_routable(2)
    assert {await dep.chat("m") for _ in range(4)} == {"a", "b"}


async def test_timeout_is_retried_elsewhere_when_configured(dep):
    await dep.start_mock("hung", ["m"], hang_after=0)
    await dep.start_mock("ok", ["m"])
    await dep.start_router(policy="round_robin", read_timeout=0.3, retry_on_timeout=True, health_interval=60)
    await dep.wait_routable(2)
    assert [await dep.chat("m") for _ in range(2)] == ["ok", "ok"]
    _, stats, _ = await dep.get("/stats")
    hung = [s for s in stats["services"] if s["name"] == "hung"][0]
    assert hung["errors"].get("timeout") == 1 and hung["circuit"] == "open"
