"""Hostile records against the registry over a real socket: every one is refused with a 400/413/429
envelope naming the problem, the table is unchanged, and GET /services stays strict JSON."""
from __future__ import annotations

import json

import pytest

from infinilm_svc.config import RegistryConfig
from infinilm_svc.config.registry import is_loopback
from infinilm_svc.registry.app import create_app


def rec(name="svc-a", host="10.1.2.3", port=8100, **kw):
    body = {"name": name, "host": host, "hostname": host, "port": port,
            "url": f"http://{host}:{port}", "status": "running"}
    body.update(kw)
    return body


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


async def strict_table(client) -> dict:
    """GET /services parsed as a strict parser would (no NaN/Infinity, valid UTF-8)."""
    raw = await (await client.get("/services")).read()
    return strict_loads(raw.decode("utf-8", "strict"))


@pytest.fixture
async def client(aiohttp_client):
    cfg = RegistryConfig(bind="127.0.0.1", port=1, probe_interval=0, max_services=5, max_metadata_bytes=2048)
    return await aiohttp_client(create_app(cfg))


def raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


BAD_REGISTRATIONS = [
    # item 1: metadata fields the router gives meaning to, with the wrong type
    (json.dumps(rec(metadata={"type": "openai-api", "models": 5})), 400, "metadata.models"),
    (json.dumps(rec(metadata={"type": "openai-api", "models": True})), 400, "metadata.models"),
    (json.dumps(rec(metadata={"type": "openai-api", "models": 1.5})), 400, "metadata.models"),
    (json.dumps(rec(metadata={"type": "openai-api", "models": ["a", 3]})), 400, "metadata.models"),
    (json.dumps(rec(metadata={"type": 7})), 400, "metadata.type"),
    (json.dumps(rec(metadata={"weight": "heavy"})), 400, "metadata.weight"),
    (json.dumps(rec(metadata={"weight": -1})), 400, "metadata.weight"),
    (json.dumps(rec(metadata={"cache_type": []})), 400, "metadata.cache_type"),
    (json.dumps(rec(metadata={"models_list": [1]})), 400, "metadata.models_list"),
    (json.dumps(rec(metadata={"babysitter_url": "javascript:alert(1)"})), 400, "metadata.babysitter_url"),
    # item 6: values a strict JSON parser cannot read back
    ('{"name": "n", "host": "h", "port": 80, "metadata": {"x": NaN}}', 400, "invalid JSON"),
    ('{"name": "n", "host": "h", "port": 80, "metadata": {"x": Infinity}}', 400, "invalid JSON"),
    ('{"name": "n", "host": "h", "port": 80, "metadata": {"x": -Infinity}}', 400, "invalid JSON"),
    ('{"name": "n\\ud800", "host": "h", "port": 80}', 400, "'name'"),
    ('{"name": "n", "host": "h", "port": 80, "metadata": {"x": "\\udfff"}}', 400, "lone surrogate"),
    # item 6: names outside the documented safe set
    (json.dumps(rec(name="..")), 400, "'name'"),
    (json.dumps(rec(name=".")), 400, "'name'"),
    (json.dumps(rec(name="a\r\nX-Evil: 1")), 400, "'name'"),
    (json.dumps(rec(name="tab\there")), 400, "'name'"),
    (json.dumps(rec(name="a b")), 400, "'name'"),
    (json.dumps(rec(name="x" * 254)), 400, "'name'"),
    # item 6: URLs and hosts that cannot be connected to
    (json.dumps(rec(url="http://127.0.0.99:99999")), 400, "'url'"),
    (json.dumps(rec(url="javascript:alert(1)")), 400, "'url'"),
    (json.dumps(rec(url="ftp://10.1.2.3:21")), 400, "'url'"),
    (json.dumps(rec(url="http://")), 400, "'url'"),
    (json.dumps(rec(url="http://user:pw@10.1.2.3:8100")), 400, "'url'"),
    (json.dumps(rec(host="10.1.2.3/evil")), 400, "'host'"),
    (json.dumps(rec(host="a b")), 400, "'host'"),
    (json.dumps(rec(status="run\nning")), 400, "'status'"),
    # item 7: nesting deeper than any parser's stack
    ('{"name": "n", "host": "h", "port": 80, "metadata": {"x": ' + "[" * 100000 + "]" * 100000 + "}}",
     400, "nested too deeply"),
]


@pytest.mark.parametrize("body, status, fragment", BAD_REGISTRATIONS,
                         ids=[f"{i}-{frag.strip(chr(39))}" for i, (_, _, frag) in enumerate(BAD_REGISTRATIONS)])
async def test_hostile_registration_is_refused_naming_the_field_and_changes_nothing(client, body, status, fragment):
    assert (await client.post("/services", json=rec(name="keep"))).status == 201
    before = await strict_table(client)
    r = await client.post("/services", data=raw(body), headers={"Content-Type": "application/json"})
    assert r.status == status, await r.text()
    err = (await r.json())["error"]
    assert fragment in err["message"], err
    after = await strict_table(client)
    assert [s["name"] for s in after["services"]] == ["keep"]
    assert after["index"] == before["index"]


async def test_hostile_put_and_heartbeat_are_refused_and_change_nothing(client):
    assert (await client.post("/services", json=rec(metadata={"type": "openai-api", "models": ["m"]}))).status == 201
    before = await (await client.get("/services/svc-a")).json()
    for method, path, body in (
        ("PUT", "/services/svc-a", {"url": "javascript:alert(1)"}),
        ("PUT", "/services/svc-a", {"metadata": {"models": 5}}),
        ("PUT", "/services/svc-a", {"host": "h\r\n"}),
        ("POST", "/services/svc-a/heartbeat", {"metadata": {"models": True}}),
        ("POST", "/services/svc-a/heartbeat", {"status": "x" * 65}),
    ):
        r = await client.request(method, path, json=body)
        assert r.status == 400, (method, body, await r.text())
    r = await client.post("/services/svc-a/heartbeat", data=b'{"metadata": {"x": NaN}}',
                          headers={"Content-Type": "application/json"})
    assert r.status == 400
    after = await (await client.get("/services/svc-a")).json()
    assert {k: after[k] for k in ("url", "host", "metadata", "status")} == \
        {k: before[k] for k in ("url", "host", "metadata", "status")}
    await strict_table(client)


async def test_the_safe_name_set_still_takes_the_names_we_generate(client):
    for name in ("babysitter-a", "babysitter-a-server", "router-::1-8000", "router-host.example.com-8000",
                 "_x", "a@b", "A.B_c-9"):
        r = await client.post("/services", json=rec(name=name))
        assert r.status == 201, (name, await r.text())
        assert (await client.delete(f"/services/{name}")).status == 200


async def test_metadata_over_the_limit_is_413_and_heartbeats_cannot_grow_it(client):
    r = await client.post("/services", json=rec(metadata={"blob": "x" * 3000}))
    assert r.status == 413 and (await r.json())["error"]["code"] == "metadata_too_large"
    assert (await client.post("/services", json=rec(metadata={"blob": "x" * 1000}))).status == 201
    # Heartbeats merge metadata: each adds a key that alone fits, until the merged record would not.
    codes = []
    for i in range(4):
        r = await client.post("/services/svc-a/heartbeat", json={"metadata": {f"k{i}": "y" * 500}})
        codes.append(r.status)
    assert codes[:2] == [200, 200] and codes[-1] == 413, codes
    md = (await (await client.get("/services/svc-a")).json())["metadata"]
    assert len(json.dumps(md)) <= 2048


async def test_record_count_is_capped_with_429_but_existing_names_can_still_register(client):
    for i in range(5):
        assert (await client.post("/services", json=rec(name=f"s{i}"))).status == 201
    r = await client.post("/services", json=rec(name="one-too-many"))
    assert r.status == 429
    err = (await r.json())["error"]
    assert err["code"] == "too_many_services" and "max_services" in err["message"]
    assert (await client.post("/services", json=rec(name="s0", port=9000))).status == 201
    assert (await strict_table(client))["total"] == 5


async def test_a_read_of_service_health_does_not_count_as_a_heartbeat(aiohttp_client, aiohttp_server):
    """GET /services/{name}/health may probe, but must not refresh the record's heartbeat."""
    from aiohttp import web

    async def ok(request):
        return web.json_response({"status": "ok"})

    bs = web.Application()
    bs.router.add_get("/health", ok)
    server = await aiohttp_server(bs, host="127.0.0.1")
    client = await aiohttp_client(create_app(RegistryConfig(bind="127.0.0.1", port=1, probe_interval=0)))
    await client.post("/services", json=rec(host="127.0.0.1", port=server.port - 1, metadata={"type": "openai-api"}))
    before = (await (await client.get("/services/svc-a")).json())["last_heartbeat"]
    body = await (await client.get("/services/svc-a/health")).json()
    assert body["health_status"] == "healthy"
    after = await (await client.get("/services/svc-a")).json()
    assert after["last_heartbeat"] == before
    assert (await (await client.get("/stats")).json())["heartbeats"] == 0


async def test_the_registry_tells_its_heartbeat_ttl(aiohttp_client):
    client = await aiohttp_client(create_app(RegistryConfig(bind="127.0.0.1", heartbeat_ttl=6, probe_interval=0)))
    assert (await (await client.get("/health")).json())["heartbeat_ttl"] == 6
    r = await client.post("/services", json=rec())
    assert (await r.json())["heartbeat_ttl"] == 6
    r = await client.post("/services/svc-a/heartbeat")
    body = await r.json()
    assert body["heartbeat_ttl"] == 6 and body["service"]["url"] == "http://10.1.2.3:8100"


@pytest.mark.parametrize("bind, ok", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                      ("0.0.0.0", False), ("", False), ("::", False), ("10.0.0.5", False)])
def test_a_registry_on_a_non_loopback_address_needs_a_token_or_insecure(bind, ok):
    assert is_loopback(bind) is ok
    problems = dict(RegistryConfig(bind=bind).check())
    assert ("bind" not in problems) is ok
    if not ok:
        assert "token" in problems["bind"] and "insecure = true" in problems["bind"]
    assert "bind" not in dict(RegistryConfig(bind=bind, token="t").check())
    assert "bind" not in dict(RegistryConfig(bind=bind, insecure=True).check())
