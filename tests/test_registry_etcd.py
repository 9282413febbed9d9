"""The etcd store beyond the shared API suite: several registries, leases, revisions, losing etcd."""
from __future__ import annotations

import asyncio
import base64
import json
import uuid

import aiohttp
import pytest

from etcd_cluster import EtcdCluster
from harness import async_wait_for, free_port
from infinilm_svc.config import RegistryConfig
from infinilm_svc.registry.app import create_app
from infinilm_svc.runtime import StartupError


def rec(name="svc", status="running", **kw):
    return {"name": name, "host": "127.0.0.1", "port": 9100, "status": status, **kw}


def etcd_config(endpoints, prefix=None, **kw) -> RegistryConfig:
    return RegistryConfig(store="etcd", etcd_endpoints=tuple(endpoints), probe_interval=0,
                          etcd_prefix=prefix or f"/test-{uuid.uuid4().hex[:12]}/", **kw)


async def etcd_range(endpoint: str, prefix: str) -> tuple[int, list[str]]:
    """(etcd's revision, keys under prefix), read straight from etcd."""
    end = bytearray(prefix.encode())
    end[-1] += 1
    body = {"key": base64.b64encode(prefix.encode()).decode(), "range_end": base64.b64encode(bytes(end)).decode()}
    async with aiohttp.ClientSession() as s, s.post(endpoint + "/v3/kv/range", json=body) as r:
        data = await r.json()
    keys = [base64.b64decode(kv["key"]).decode() for kv in data.get("kvs", [])]
    return int(data["header"]["revision"]), keys


async def test_two_registries_serve_one_table_and_a_watch_continues_on_the_other(aiohttp_client, etcd_server):
    cfg = etcd_config(etcd_server.endpoints)
    r1 = await aiohttp_client(create_app(cfg))
    r2 = await aiohttp_client(create_app(cfg))
    assert (await r1.post("/services", json=rec("a"))).status == 201

    async def seen_on_r2():
        return (await r2.get("/services/a")).status == 200

    await async_wait_for(seen_on_r2, timeout=5, what="registry 2 sees registry 1's write")
    i1 = int((await r1.get("/services")).headers["X-Registry-Index"])
    i2 = int((await r2.get("/services")).headers["X-Registry-Index"])
    assert i1 == i2, "both registries must report the same index for the same table"

    # A router watching registry 1 at index i1 moves to registry 2 with the same index:
    # it wakes on the next change made anywhere, and not before.
    watch = asyncio.create_task(r2.get(f"/services?index={i1}&wait=10s"))

    async def parked():
        return (await (await r2.get("/stats")).json())["watchers"] >= 1

    await async_wait_for(parked, timeout=5, what="watcher parked on registry 2")
    assert (await r1.post("/services/a/heartbeat", json={"status": "backoff"})).status == 200
    resp = await asyncio.wait_for(watch, 10)
    body = await resp.json()
    assert int(resp.headers["X-Registry-Index"]) > i1
    assert body["services"][0]["status"] == "backoff"


async def test_a_heartbeat_that_changes_nothing_does_not_move_the_etcd_revision(aiohttp_client, etcd_server):
    cfg = etcd_config(etcd_server.endpoints)
    client = await aiohttp_client(create_app(cfg))
    await client.post("/services", json=rec(metadata={"type": "openai-api", "models": ["m"]}))
    before, keys = await etcd_range(etcd_server.endpoints[0], cfg.etcd_prefix)
    assert sorted(keys) == [cfg.etcd_prefix + "alive/svc", cfg.etcd_prefix + "services/svc"]
    for _ in range(5):
        assert (await client.post("/services/svc/heartbeat")).status == 200
        r = await client.post("/services/svc/heartbeat", json={"status": "running", "metadata": {"models": ["m"]}})
        assert r.status == 200
    after, _ = await etcd_range(etcd_server.endpoints[0], cfg.etcd_prefix)
    assert after == before, "a heartbeat that changed nothing wrote to etcd"
    assert (await client.post("/services/svc/heartbeat", json={"metadata": {"models": ["m", "n"]}})).status == 200
    assert (await etcd_range(etcd_server.endpoints[0], cfg.etcd_prefix))[0] > before


async def test_leases_expire_records_with_no_registry_running(aiohttp_client, etcd_server):
    cfg = etcd_config(etcd_server.endpoints, heartbeat_ttl=1, expire_after=2)
    client = await aiohttp_client(create_app(cfg))
    assert (await client.post("/services", json=rec("gone-soon"))).status == 201
    await client.close()                    # no registry process is left

    async def empty():
        return (await etcd_range(etcd_server.endpoints[0], cfg.etcd_prefix))[1] == []

    await async_wait_for(empty, timeout=10, what="etcd to drop the record when its lease lapsed")
    fresh = await aiohttp_client(create_app(cfg))
    assert (await fresh.get("/services/gone-soon")).status == 404


async def test_a_lapsed_record_comes_back_healthy_on_its_next_heartbeat(aiohttp_client, etcd_server):
    cfg = etcd_config(etcd_server.endpoints, heartbeat_ttl=1, expire_after=30)
    client = await aiohttp_client(create_app(cfg))
    await client.post("/services", json=rec())

    async def healthy_is(value):
        return (await (await client.get("/services/svc")).json())["is_healthy"] is value

    await async_wait_for(lambda: healthy_is(False), timeout=10, what="the alive lease to lapse")
    assert (await client.post("/services/svc/heartbeat")).status == 200
    assert (await (await client.get("/services/svc")).json())["is_healthy"] is True


async def test_etcd_unreachable_at_start_fails_the_start_naming_the_endpoints(aiohttp_client):
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with pytest.raises(StartupError) as err:
        await aiohttp_client(create_app(etcd_config(dead, etcd_timeout=0.3)))
    assert dead[0] in str(err.value) and dead[1] in str(err.value)


async def test_losing_etcd_serves_stale_reads_refuses_writes_with_503_and_recovers(aiohttp_client, tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd").start()
    try:
        client = await aiohttp_client(create_app(etcd_config(cluster.endpoints, etcd_timeout=0.5)))
        assert (await client.post("/services", json=rec("kept"))).status == 201
        h = await (await client.get("/health")).json()
        assert h["status"] == "healthy" and h["stale"] is False and h["store"] == "etcd"

        cluster.members[0].kill()

        async def stale():
            return (await (await client.get("/health")).json())["stale"] is True

        await async_wait_for(stale, timeout=10, what="/health to say the table is stale")
        h = await (await client.get("/health")).json()
        assert h["status"] == "degraded" and cluster.endpoints[0] in h["etcd_endpoints"]
        body = await (await client.get("/services")).json()
        assert [s["name"] for s in body["services"]] == ["kept"], "reads answer from the last watched table"
        r = await client.post("/services", json=rec("new"))
        assert r.status == 503 and r.headers["Retry-After"]
        err = (await r.json())["error"]
        assert err["code"] == "store_unavailable" and "etcd" in err["message"]
        r = await client.post("/services/kept/heartbeat")
        assert r.status == 503

        cluster.restart(cluster.members[0])

        async def fresh():
            return (await (await client.get("/health")).json())["stale"] is False

        await async_wait_for(fresh, timeout=15, what="the registry to recover by itself")
        assert (await client.post("/services", json=rec("new"))).status == 201
        names = sorted(s["name"] for s in (await (await client.get("/services")).json())["services"])
        assert names == ["kept", "new"]
    finally:
        cluster.stop()


def test_etcd_store_config_is_checked():
    problems = dict(RegistryConfig(store="etcd", etcd_endpoints=("nope",), etcd_prefix="x",
                                   state_file="s.json").check())
    assert "expected an http" in problems["etcd_endpoints"]
    assert "etcd_prefix" in problems and "state_file" in problems
    assert "unknown store" in dict(RegistryConfig(store="disk").check())["store"]
    assert json.dumps(RegistryConfig(bind="127.0.0.1").check()) == "[]"


async def test_a_member_that_loses_its_quorum_makes_the_registry_stale_not_silent(aiohttp_client, tmp_path):
    """Two of three members die: the survivor has no leader; its watch is cancelled, /health says stale
    and writes are refused with 503, instead of the registry serving a quiet watch as if fresh."""
    cluster = await asyncio.to_thread(EtcdCluster(tmp_path / "etcd", size=3).start)
    try:
        survivor = cluster.members[0]
        client = await aiohttp_client(create_app(etcd_config([survivor.client_url], etcd_timeout=0.5)))
        assert (await client.post("/services", json=rec("kept"))).status == 201
        for m in cluster.members[1:]:
            m.kill()

        async def stale():
            return (await (await client.get("/health")).json())["stale"] is True

        await async_wait_for(stale, timeout=20, what="/health to say stale once the quorum is gone")
        assert (await client.post("/services", json=rec("new"))).status == 503
        assert [s["name"] for s in (await (await client.get("/services")).json())["services"]] == ["kept"]
    finally:
        await asyncio.to_thread(cluster.stop)
