"""Blocking queries: a watcher wakes on every visible change and sleeps through plain heartbeats.

Every test runs against both stores: memory and a real etcd (where the index is etcd's revision)."""
from __future__ import annotations

import asyncio

import pytest

from harness import async_wait_for
from infinilm_svc.registry.app import create_app


def rec(name="svc", status="running"):
    return {"name": name, "host": "127.0.0.1", "port": 9100, "status": status}


@pytest.fixture
async def client(aiohttp_client, registry_config):
    ttl = registry_config.ttl
    cfg = registry_config(heartbeat_ttl=ttl(0.5, 1), expire_after=ttl(1.0, 2), sweep_interval=0.05, probe_interval=0)
    return await aiohttp_client(create_app(cfg))


async def index_of(client) -> int:
    return int((await client.get("/services")).headers["X-Registry-Index"])


async def watch(client, index: int, wait: str = "10s"):
    r = await client.get(f"/services?index={index}&wait={wait}")
    assert r.status == 200
    return int(r.headers["X-Registry-Index"]), await r.json()


async def parked(client, n: int) -> None:
    """Wait until `n` watchers are blocked in the registry, so a change must wake them (not be seen at once)."""
    async def enough() -> bool:
        return (await (await client.get("/stats")).json())["watchers"] >= n

    await async_wait_for(enough, timeout=10, what=f"{n} parked watcher(s)")


async def _woken_by(client, action) -> tuple[int, int, dict]:
    before = await index_of(client)
    task = asyncio.create_task(watch(client, before))
    await parked(client, 1)
    await action()
    after, body = await asyncio.wait_for(task, 10)
    return before, after, body


async def test_watch_wakes_on_register(client):
    before, after, body = await _woken_by(client, lambda: client.post("/services", json=rec()))
    assert after > before and [s["name"] for s in body["services"]] == ["svc"]


async def test_watch_wakes_on_heartbeat_status_change(client):
    await client.post("/services", json=rec())
    before, after, body = await _woken_by(
        client, lambda: client.post("/services/svc/heartbeat", json={"status": "backoff"}))
    assert after > before and body["services"][0]["status"] == "backoff"


async def test_watch_wakes_on_delete(client):
    await client.post("/services", json=rec())
    before, after, body = await _woken_by(client, lambda: client.delete("/services/svc"))
    assert after > before and body["services"] == []


async def test_watch_wakes_on_health_lapse_and_on_expiry(client):
    await client.post("/services", json=rec())
    idx = await index_of(client)
    after, body = await watch(client, idx)          # the heartbeat lapses after 0.5 s
    assert after > idx and body["services"][0]["is_healthy"] is False
    after2, body = await watch(client, after)       # then the record expires after 1 s
    assert after2 > after and body["services"] == []


async def test_plain_heartbeats_do_not_wake_watchers(client):
    await client.post("/services", json=rec())
    idx = await index_of(client)

    async def beat():
        for _ in range(5):
            await client.post("/services/svc/heartbeat")
            await client.post("/services/svc/heartbeat", json={"status": "running"})

    after, _ = await asyncio.gather(watch(client, idx, wait="300ms"), beat())
    assert after[0] == idx, "a heartbeat that changed nothing moved the index"


async def test_many_watchers_all_wake_on_one_change(client):
    idx = await index_of(client)
    watchers = [asyncio.create_task(watch(client, idx)) for _ in range(50)]
    await parked(client, 50)
    text = await (await client.get("/metrics")).text()
    assert "infinilm_registry_watchers 50.0" in text
    await client.post("/services", json=rec("x"))
    results = await asyncio.wait_for(asyncio.gather(*watchers), 10)
    assert all(i > idx and b["total"] == 1 for i, b in results)
    assert (await (await client.get("/stats")).json())["watchers"] == 0


async def test_a_stale_index_returns_at_once(client):
    await client.post("/services", json=rec())
    _, body = await asyncio.wait_for(watch(client, 0, wait="60s"), 5)
    assert body["total"] == 1
