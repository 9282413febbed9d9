"""The registry's HTTP API over a real socket: upstream shapes, status codes, and every input error.

Every test runs against both stores: memory and a real etcd."""
from __future__ import annotations

import json

import pytest
from aiohttp import web

from harness import async_wait_for
from infinilm_svc.registry.app import create_app


def rec(name="svc-a", host="10.1.2.3", port=8100, **kw):
    body = {"name": name, "host": host, "hostname": host, "port": port,
            "url": f"http://{host}:{port}", "status": "running"}
    body.update(kw)
    return body


@pytest.fixture
async def client(aiohttp_client, registry_config):
    return await aiohttp_client(create_app(registry_config(bind="127.0.0.1", port=1, probe_interval=0)))


async def test_register_answers_201_and_the_record_with_is_healthy(client):
    r = await client.post("/services", json=rec(metadata={"type": "openai-api", "models": ["m"]}))
    assert r.status == 201
    body = await r.json()
    assert body["message"] == "Service 'svc-a' registered successfully"
    s = body["service"]
    assert s["name"] == "svc-a" and s["port"] == 8100 and s["url"] == "http://10.1.2.3:8100"
    assert s["is_healthy"] is True and s["health_status"] == "unknown"
    assert s["metadata"] == {"type": "openai-api", "models": ["m"]}
    assert s["timestamp"].endswith("Z") and isinstance(s["last_heartbeat"], float)
    assert int(r.headers["X-Registry-Index"]) >= 2


async def test_reregistering_a_name_overwrites_it(client):
    await client.post("/services", json=rec(port=8100))
    await client.post("/services", json=rec(port=8200))
    body = await (await client.get("/services")).json()
    assert body["total"] == 1 and body["services"][0]["port"] == 8200


async def test_wildcard_host_is_replaced_by_the_registrations_source_address(client):
    for host in ("0.0.0.0", "::", ""):
        r = await client.post("/services", json=rec(name=f"w{len(host)}", host=host, port=9000))
        s = (await r.json())["service"]
        assert s["host"] == "127.0.0.1", host
        assert s["hostname"] == "127.0.0.1"
        assert s["url"] == "http://127.0.0.1:9000"


async def test_get_put_delete_and_404_for_unknown_names(client):
    await client.post("/services", json=rec())
    r = await client.get("/services/svc-a")
    assert r.status == 200 and (await r.json())["name"] == "svc-a"
    r = await client.put("/services/svc-a", json={"status": "maintenance", "metadata": {"x": 1}})
    assert r.status == 200
    body = await r.json()
    assert body["message"] == "Service 'svc-a' updated successfully"
    assert body["service"]["status"] == "maintenance" and body["service"]["metadata"] == {"x": 1}
    assert body["service"]["is_healthy"] is False
    r = await client.delete("/services/svc-a")
    assert r.status == 200 and (await r.json())["message"] == "Service 'svc-a' unregistered successfully"
    for method, path in (("GET", "/services/svc-a"), ("PUT", "/services/svc-a"), ("DELETE", "/services/svc-a"),
                         ("POST", "/services/svc-a/heartbeat"), ("GET", "/services/svc-a/health")):
        r = await client.request(method, path, json={} if method == "PUT" else None)
        assert r.status == 404, (method, path)
        err = (await r.json())["error"]
        assert err["message"] == "Service 'svc-a' not found" and err["code"] == "service_not_found"


async def test_heartbeat_sets_status_and_merges_metadata(client):
    await client.post("/services", json=rec(metadata={"type": "openai-api", "models": ["m"]}))
    r = await client.post("/services/svc-a/heartbeat")
    assert r.status == 200 and (await r.json())["message"] == "Heartbeat received"
    r = await client.post("/services/svc-a/heartbeat", json={"status": "backoff", "metadata": {"restarts": 2}})
    assert r.status == 200
    s = await (await client.get("/services/svc-a")).json()
    assert s["status"] == "backoff" and s["is_healthy"] is False
    assert s["metadata"] == {"type": "openai-api", "models": ["m"], "restarts": 2}


async def test_status_and_healthy_filters(client):
    await client.post("/services", json=rec(name="up"))
    await client.post("/services", json=rec(name="down", status="stopped"))
    names = lambda b: sorted(s["name"] for s in b["services"])  # noqa: E731
    assert names(await (await client.get("/services?healthy=true")).json()) == ["up"]
    assert names(await (await client.get("/services?healthy=false")).json()) == ["down"]
    assert names(await (await client.get("/services?healthy=anything")).json()) == ["down"]
    assert names(await (await client.get("/services?status=stopped")).json()) == ["down"]
    assert names(await (await client.get("/services")).json()) == ["down", "up"]


async def test_health_and_stats_shapes(client):
    await client.post("/services", json=rec(name="a"))
    await client.post("/services", json=rec(name="b", host="10.9.9.9", status="starting"))
    h = await (await client.get("/health")).json()
    assert h["status"] == "healthy" and h["registry"] == "running"
    assert h["registered_services"] == 2 and h["healthy_services"] == 1
    s = await (await client.get("/stats")).json()
    assert s["total_services"] == 2 and s["healthy_services"] == 1 and s["unhealthy_services"] == 1
    assert s["status_distribution"] == {"running": 1, "starting": 1}
    assert s["host_distribution"] == {"10.1.2.3": 1, "10.9.9.9": 1}
    assert s["uptime"] >= 0 and s["registrations"] == 2


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "empty"),
    (json.dumps({"host": "h", "port": 1}).encode(), 400, "missing required field: name"),
    (json.dumps({"name": "n", "port": 1}).encode(), 400, "missing required field: host"),
    (json.dumps({"name": "n", "host": "h"}).encode(), 400, "missing required field: port"),
    (json.dumps({"name": "n", "host": "h", "port": "80"}).encode(), 400, "'port' must be an integer"),
    (json.dumps({"name": "n", "host": "h", "port": True}).encode(), 400, "'port' must be an integer"),
    (json.dumps({"name": "n", "host": "h", "port": 0}).encode(), 400, "between 1 and 65535"),
    (json.dumps({"name": "n", "host": "h", "port": 65536}).encode(), 400, "between 1 and 65535"),
    (json.dumps({"name": "", "host": "h", "port": 80}).encode(), 400, "'name' must be 1 to 253 characters"),
    (json.dumps({"name": "a/b", "host": "h", "port": 80}).encode(), 400, "'name' must be 1 to 253 characters"),
    (json.dumps({"name": 5, "host": "h", "port": 80}).encode(), 400, "'name' must be 1 to 253 characters"),
    (json.dumps({"name": "n", "host": 1, "port": 80}).encode(), 400, "'host' must be a string"),
    (json.dumps({"name": "n", "host": "h", "port": 80, "metadata": []}).encode(), 400, "'metadata' must be an object"),
])
async def test_bad_registrations_get_a_400_envelope_naming_the_problem(client, body, status, fragment):
    r = await client.post("/services", data=body, headers={"Content-Type": "application/json"})
    assert r.status == status
    err = (await r.json())["error"]
    assert fragment in err["message"]
    assert err["type"] == "invalid_request_error"
    assert (await (await client.get("/services")).json())["total"] == 0


async def test_body_over_one_mib_is_413(client):
    big = json.dumps(rec(metadata={"blob": "x" * (1 << 20)})).encode()
    r = await client.post("/services", data=big, headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert "too large" in (await r.json())["error"]["message"]


async def test_bad_heartbeat_and_put_bodies_are_400_and_change_nothing(client):
    await client.post("/services", json=rec())
    r = await client.post("/services/svc-a/heartbeat", data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/services/svc-a/heartbeat", json={"status": 3})
    assert r.status == 400
    r = await client.put("/services/svc-a", json={"port": 70000})
    assert r.status == 400
    s = await (await client.get("/services/svc-a")).json()
    assert s["status"] == "running" and s["port"] == 8100


async def test_bad_watch_parameters_are_400(client):
    assert (await client.get("/services?index=abc")).status == 400
    r = await client.get("/services?index=1&wait=soon")
    assert r.status == 400 and "invalid wait" in (await r.json())["error"]["message"]


async def test_token_guards_writes_but_not_reads(aiohttp_client, registry_config):
    client = await aiohttp_client(create_app(registry_config(token="s3cret", probe_interval=0)))
    r = await client.post("/services", json=rec())
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await r.json())["error"]["code"] == "invalid_token"
    r = await client.post("/services", json=rec(), headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/services", json=rec(), headers=ok)).status == 201
    for method, path in (("POST", "/services/svc-a/heartbeat"), ("PUT", "/services/svc-a"), ("DELETE", "/services/svc-a")):
        r = await client.request(method, path, json={} if method == "PUT" else None)
        assert r.status == 401, (method, path)
    assert (await client.get("/services")).status == 200
    assert (await client.get("/services/svc-a")).status == 200
    assert (await client.post("/services/svc-a/heartbeat", headers=ok)).status == 200
    assert (await client.delete("/services/svc-a", headers=ok)).status == 200


async def test_live_probe_checks_the_babysitter_port_of_a_backend(aiohttp_server, client):
    """GET /services/{name}/health probes http://host:P+1/health for openai-api records."""
    answer = {"status": 200}

    async def bs_health(request):
        return web.json_response({"status": "ok"}, status=answer["status"])

    bs = web.Application()
    bs.router.add_get("/health", bs_health)
    server = await aiohttp_server(bs, host="127.0.0.1")
    await client.post("/services", json=rec(host="127.0.0.1", port=server.port - 1, metadata={"type": "openai-api"}))
    body = await (await client.get("/services/svc-a/health")).json()
    assert body["service"] == "svc-a" and body["health_status"] == "healthy" and body["is_healthy"] is True
    answer["status"] = 503
    body = await (await client.get("/services/svc-a/health")).json()
    assert body["health_status"] == "unhealthy"
    assert (await (await client.get("/services/svc-a")).json())["health_status"] == "unhealthy"


async def test_metrics_count_services_by_type_and_events(client):
    await client.post("/services", json=rec(name="b1", metadata={"type": "openai-api"}))
    await client.post("/services", json=rec(name="r1", metadata={"type": "router"}, status="stopped"))
    await client.post("/services/b1/heartbeat")
    text = await (await client.get("/metrics")).text()
    assert 'infinilm_registry_services{type="openai-api"} 1.0' in text
    assert 'infinilm_registry_healthy_services{type="router"} 0.0' in text
    assert "infinilm_registry_registrations_total 2.0" in text
    assert "infinilm_registry_heartbeats_total 1.0" in text


async def test_records_lapse_then_expire(aiohttp_client, registry_config):
    ttl = registry_config.ttl
    cfg = registry_config(heartbeat_ttl=ttl(0.3, 1), expire_after=ttl(0.6, 2), sweep_interval=0.05, probe_interval=0)
    client = await aiohttp_client(create_app(cfg))
    await client.post("/services", json=rec())

    async def healthy():
        return (await (await client.get("/services/svc-a")).json()).get("is_healthy")

    assert await healthy() is True

    async def lapsed():
        r = await client.get("/services/svc-a")
        return r.status == 200 and (await r.json())["is_healthy"] is False

    await async_wait_for(lapsed, timeout=5, what="heartbeat lapse")
    await async_wait_for(lambda: _gone(client), timeout=5, what="expiry")
    text = await (await client.get("/metrics")).text()
    assert "infinilm_registry_expiries_total 1.0" in text


async def _gone(client):
    return (await client.get("/services/svc-a")).status == 404


async def test_unknown_endpoint_and_method_get_the_envelope(client):
    r = await client.get("/nope")
    assert r.status == 404 and "error" in await r.json()
    r = await client.patch("/services")
    assert r.status == 405 and "not allowed" in (await r.json())["error"]["message"]


async def test_answers_are_compact_json_as_upstream_scripts_grep_them(client):
    """`grep -o '"name":"[^"]*"'` (upstream's validate.sh) finds every record; errors are compact too."""
    import re

    for name in ("svc-a", "svc-b"):
        assert (await client.post("/services", json=rec(name))).status == 201
    text = await (await client.get("/services")).text()
    assert re.findall(r'"name":"[^"]*"', text) == ['"name":"svc-a"', '"name":"svc-b"']
    assert '": ' not in text
    error = await (await client.get("/services/nope")).text()
    assert error.startswith('{"error":{"message":'), error
