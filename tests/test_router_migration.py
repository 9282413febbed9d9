"""Request migration: a backend that dies mid-answer costs the client nothing."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import pytest

from router_harness import HOST, Deployment, dep  # noqa: F401 (dep: a fixture)
from test_router_proxy import start_mock_process

CHUNKS = 12


def chat(stream: bool = True, **extra) -> dict:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "tell me"}], **extra}


async def read_stream(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[str, list[dict], int, dict]:
    """(text, the JSON events, the count of [DONE], the response headers) of one streamed request."""
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        raw = (await r.read()).decode()
        headers = dict(r.headers)
    events, done = [], 0
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block.startswith("data:"):
            continue
        payload = block[5:].strip()
        if payload == "[DONE]":
            done += 1
        else:
            events.append(json.loads(payload))
    text = ""
    for ev in events:
        for ch in ev.get("choices") or ():
            text += (ch.get("delta") or {}).get("content") or ch.get("text") or ""
    return text, events, done, headers


async def uninterrupted(dep: Deployment, name: str, body: dict, chunks: int = CHUNKS) -> str:
    """The answer the dying mock would give with no failure: the same mock, unharmed, asked directly."""
    port = await dep.start_mock(name, ["m"], register=False, chunks=chunks)
    text, _, _, _ = await read_stream(dep.session, f"http://{HOST}:{port}/v1/chat/completions"
                                      if "messages" in body else f"http://{HOST}:{port}/v1/completions", body)
    return text


async def model_stats(dep: Deployment) -> tuple[dict, dict]:
    _, stats, _ = await dep.get("/stats")
    return {s["name"]: s for s in stats["services"]}, stats["models"]["m"]


async def test_a_stream_whose_backend_dies_is_continued_word_for_word_on_another(dep):
    await dep.start_mock("a-dies", ["m"], chunks=CHUNKS, die_mid_stream_after=4)
    await dep.start_mock("b-good", ["m"], chunks=CHUNKS)
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    body = chat(stream_options={"include_usage": True})
    text, events, done, headers = await read_stream(dep.session, dep.router_url + "/v1/chat/completions", body)
    assert headers["X-InfiniLM-Backend"] == "a-dies"
    assert text == await uninterrupted(dep, "a-dies", body)
    assert done == 1 and not any("error" in ev for ev in events)
    assert len({ev["id"] for ev in events}) == 1 and len({ev["created"] for ev in events}) == 1
    roles = [ch["delta"]["role"] for ev in events for ch in ev.get("choices") or () if "role" in ch.get("delta", {})]
    assert roles == ["assistant"]
    usage = [ev["usage"] for ev in events if not ev.get("choices") and ev.get("usage")]
    assert len(usage) == 1 and usage[0]["completion_tokens"] == CHUNKS
    services, model = await model_stats(dep)
    assert services["a-dies"]["migrations"] == 1 and services["a-dies"]["errors"] == {"stream_broken": 1}
    assert model["migrations"] == 1 and model["error_count"] == 0
    assert services["b-good"]["errors"] == {}


async def test_the_continuation_is_asked_for_only_the_tokens_left(dep):
    """max_tokens counts both attempts: 8 tokens in all, 4 from each backend."""
    await dep.start_mock("a-dies", ["m"], chunks=CHUNKS, die_mid_stream_after=4)
    await dep.start_mock("b-good", ["m"], chunks=CHUNKS)
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    body = chat(max_tokens=8)
    text, events, done, _ = await read_stream(dep.session, dep.router_url + "/v1/chat/completions", body)
    full = await uninterrupted(dep, "a-dies", chat())
    assert text == await uninterrupted(dep, "a-dies", body) and len(text) < len(full) and full.startswith(text)
    finishes = [ch["finish_reason"] for ev in events for ch in ev["choices"] if ch.get("finish_reason")]
    assert finishes == ["length"] and done == 1


async def test_a_completion_stream_is_continued_from_its_prompt_and_text(dep):
    await dep.start_mock("a-dies", ["m"], chunks=CHUNKS, die_mid_stream_after=5)
    await dep.start_mock("b-good", ["m"], chunks=CHUNKS)
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    body = {"model": "m", "prompt": "Once upon a time", "stream": True}
    text, events, done, _ = await read_stream(dep.session, dep.router_url + "/v1/completions", body)
    assert text == await uninterrupted(dep, "a-dies", body) and done == 1
    assert len({ev["id"] for ev in events}) == 1


async def test_with_migrations_off_the_client_gets_the_error_event(dep):
    await dep.start_mock("a-dies", ["m"], chunks=CHUNKS, die_mid_stream_after=4)
    await dep.start_mock("b-good", ["m"], chunks=CHUNKS)
    await dep.start_router(policy="round_robin", health_interval=300, migrations=0)
    await dep.wait_routable(2)
    async with dep.session.post(dep.router_url + "/v1/chat/completions", json=chat()) as r:
        raw = (await r.read()).decode()
    last = json.loads([b for b in raw.split("\n\n") if b.strip()][-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_stream_error" and "[DONE]" not in raw
    services, model = await model_stats(dep)
    assert services["a-dies"]["migrations"] == 0 and model["errors"] == {"stream_broken": 1}


async def test_a_body_cut_halfway_is_retried_whole_on_another_backend(dep):
    await dep.start_mock("a-dies", ["m"], chunks=CHUNKS, die_mid_stream_after=1)
    await dep.start_mock("b-good", ["m"], chunks=CHUNKS)
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    status, data, headers = await dep.post("/v1/chat/completions", chat(stream=False))
    assert status == 200 and headers["X-InfiniLM-Backend"] == "b-good"
    assert data["choices"][0]["message"]["content"].startswith("Hello from b-good")
    services, _ = await model_stats(dep)
    assert services["a-dies"]["errors"] == {"upstream_io": 1}


async def test_openai_sdk_stream_survives_a_kill_9_of_its_backend(dep, procs):
    openai = pytest.importorskip("openai")
    port_a, proc_a = await start_mock_process(dep, procs, "a-dies", ["m"], "--chunks", "60", "--chunk-interval", "0.02")
    await start_mock_process(dep, procs, "b-good", ["m"], "--chunks", "60")
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    client = openai.AsyncOpenAI(base_url=dep.router_url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "tell me"}],
                                                      stream=True)
        text, ids, n = "", set(), 0
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                n += 1
                if n == 10:
                    os.kill(proc_a.pid, signal.SIGKILL)
    finally:
        await client.close()
    assert text == await uninterrupted(dep, "a-dies", chat(), chunks=60) and len(ids) == 1
    services, model = await model_stats(dep)
    assert services["a-dies"]["migrations"] == 1 and model["migrations"] == 1 and model["error_count"] == 0


async def test_under_load_every_stream_open_on_a_killed_backend_migrates(dep, procs):
    _, proc_a = await start_mock_process(dep, procs, "a", ["m"], "--chunks", "80", "--chunk-interval", "0.02")
    await start_mock_process(dep, procs, "b", ["m"], "--chunks", "80", "--chunk-interval", "0.005")
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    n = 32
    started = asyncio.Event()
    first_chunks = 0

    async def one(session: aiohttp.ClientSession) -> tuple[str, str, int]:
        nonlocal first_chunks
        async with session.post(dep.router_url + "/v1/chat/completions", json=chat()) as r:
            assert r.status == 200
            backend = r.headers["X-InfiniLM-Backend"]
            await r.content.readline()
            first_chunks += 1
            if first_chunks == n:
                started.set()
            raw = (await r.read()).decode()
        return backend, raw, r.status

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(n)]
        await asyncio.wait_for(started.wait(), 30)
        os.kill(proc_a.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks)
    on_a = sum(1 for backend, _, _ in results if backend == "a")
    assert 0 < on_a < n
    assert all(raw.count("data: [DONE]") == 1 and "upstream_stream_error" not in raw for _, raw, _ in results)
    services, model = await model_stats(dep)
    assert services["a"]["migrations"] == on_a == model["migrations"]
    assert model["error_count"] == 0
