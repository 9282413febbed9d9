"""Request migration on a real engine: llama-server killed mid-stream, the answer continued on another."""
from __future__ import annotations

import json
import os
import signal

import aiohttp

from engine import engine  # noqa: F401 (a fixture)
from harness import async_wait_for, free_port
from router_harness import HOST, dep  # noqa: F401 (a fixture)


def start_engine(procs, engine, name: str) -> tuple[int, object]:  # noqa: F811
    port = free_port()
    proc = procs.start([str(engine.server), "--model", str(engine.model_1), "--host", HOST, "--port", str(port),
                        "-c", "4096", "-np", "1", "--alias", "tiny"], name=name)
    return port, proc


async def stream_text(session: aiohttp.ClientSession, url: str, body: dict, on_piece=None) -> tuple[str, list[dict], int]:
    """The concatenated text, the JSON events and the number of [DONE] of one streamed completion."""
    text, events, done, n = "", [], 0, 0
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done += 1
                continue
            ev = json.loads(payload)
            events.append(ev)
            for ch in ev.get("choices") or ():
                piece = ch.get("text") or ""
                if piece:
                    text += piece
                    n += 1
                    if on_piece is not None:
                        await on_piece(n, text)
    return text, events, done


async def test_a_llama_server_killed_mid_stream_is_continued_on_another(engine, dep, procs):  # noqa: F811
    port_a, proc_a = start_engine(procs, engine, "engine-a")
    port_b, proc_b = start_engine(procs, engine, "engine-b")

    async def up(port: int) -> bool:
        try:
            async with dep.session.get(f"http://{HOST}:{port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False
    for port in (port_a, port_b):
        await async_wait_for(lambda port=port: up(port), timeout=30, what="llama-server ready")
    await dep.register("a-engine", port_a, ["tiny"])
    await dep.register("b-engine", port_b, ["tiny"])
    await dep.start_router(policy="round_robin", health_interval=300)
    await dep.wait_routable(2)
    # ignore_eos: the tiny model may end early, and a stream that ends before the kill cannot migrate.
    # 1,000 tokens, the kill at the 2nd piece: with 400 the engine could finish the whole answer before
    # the client read its 8th piece, leaving nothing to migrate; 1,500 did not fit 60 s under load.
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    # The answer with no failure (same model on both, greedy sampling).
    expected, _, _ = await stream_text(dep.session, f"http://{HOST}:{port_b}/v1/completions", body)

    at_kill: list[str] = []
    killed: list[str] = []
    engines = {"a-engine": proc_a, "b-engine": proc_b}

    async def kill_serving(n: int, text: str) -> None:
        # The engine the router chose (the policy's starting point is not fixed): kill -9 it.
        if n == 2 and not killed:
            _, stats, _ = await dep.get("/stats")
            serving = [sv["name"] for sv in stats["services"] if sv["in_flight"] == 1]
            assert len(serving) == 1, stats["services"]
            os.kill(engines[serving[0]].pid, signal.SIGKILL)
            killed.append(serving[0])
            at_kill.append(text)
    text, events, done = await stream_text(dep.session, dep.router_url + "/v1/completions", body, kill_serving)
    _, stats, _ = await dep.get("/stats")
    services = {s["name"]: s for s in stats["services"]}
    assert killed and services[killed[0]]["migrations"] == 1, services
    assert done == 1 and len({ev["id"] for ev in events}) == 1
    common = len(os.path.commonprefix([text, expected]))
    print(f"stitched {len(text)} chars, uninterrupted {len(expected)}; identical for the first {common} "
          f"(the client had {len(at_kill[0])} when the engine was killed)")
    # What the client had is kept exactly, and the answer goes on from there. Word for word equality
    # with the uninterrupted answer is not possible on this engine: the continuation's prompt
    # (prompt + partial text) is tokenised afresh, and where the partial text ends inside a word
    # its tokens differ from the ones generated, so greedy decoding takes another path.
    assert at_kill and common >= len(at_kill[0]) and text.startswith(at_kill[0])
    assert len(text) > len(at_kill[0])
