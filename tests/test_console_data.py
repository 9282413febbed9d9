"""The console's data layer against a real registry and routers' /stats: sums, rates, stale and expired rows."""
from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from console.poller import Poller
from harness import async_wait_for
from infinilm_svc.client.babysitter import BabysitterClient, BabysitterError
from infinilm_svc.config.registry import RegistryConfig
from infinilm_svc.registry.app import create_app as create_registry

HOST = "127.0.0.1"


def _stats(backend_counts: dict[str, tuple[int, int, int, float]], model_counts: dict[str, int]) -> dict:
    return {
        "total_services": len(backend_counts), "healthy_services": len(backend_counts), "registry_url": "x",
        "services": [{"name": n, "request_count": r, "error_count": e, "in_flight": f, "healthy": True,
                      "registry_healthy": True, "active_healthy": True, "circuit": "closed",
                      "latency_ms": {"p50": p, "p90": p * 2, "p99": p * 3},
                      "tokens": {"prompt": r * 10, "completion": r, "cached": r * (e + 1)}, "migrations": e}
                     for n, (r, e, f, p) in backend_counts.items()],
        "models": {m: {"request_count": c, "error_count": 0, "in_flight": 0,
                       "latency_ms": {"p50": 5.0, "p90": 6.0, "p99": 7.0},
                       "tokens": {"prompt": c * 10, "completion": c, "cached": c * 2}} for m, c in model_counts.items()},
    }


async def _router(aiohttp_server, body: dict):
    async def stats(request):
        return web.json_response(body["stats"])
    app = web.Application()
    app.router.add_get("/stats", stats)
    return await aiohttp_server(app, host=HOST)


async def test_poll_sums_router_stats_computes_rates_and_marks_stale_and_expired(aiohttp_server):
    """Counts are summed over routers, latency weighted by requests, rates from deltas; late and gone rows marked."""
    registry = await aiohttp_server(create_registry(RegistryConfig(bind=HOST, port=0, sweep_interval=0.2)), host=HOST)
    r1_body = {"stats": _stats({"b-server": (100, 2, 1, 10.0)}, {"m1": 100})}
    r2_body = {"stats": _stats({"b-server": (300, 1, 2, 20.0)}, {"m1": 300})}
    r1, r2 = await _router(aiohttp_server, r1_body), await _router(aiohttp_server, r2_body)
    reg_url = f"http://{HOST}:{registry.port}"
    base = {"host": HOST, "hostname": HOST, "status": "running"}
    records = [
        {**base, "name": "b", "port": 9101, "url": "http://x:9101",
         "metadata": {"role": "babysitter", "backend": "b-server", "babysitter": "enhanced"}},
        {**base, "name": "b-server", "port": 9100, "url": "http://x:9100",
         "metadata": {"type": "openai-api", "role": "backend", "models": ["m1"], "restarts": 4,
                      "babysitter_url": "http://x:9101"}},
        *({**base, "name": f"router-{i}", "port": srv.port, "url": f"http://{HOST}:{srv.port}",
           "metadata": {"type": "router", "role": "router", "url": f"http://{HOST}:{srv.port}"}}
          for i, srv in enumerate((r1, r2))),
        {**base, "name": "router-dead", "port": 1, "url": f"http://{HOST}:1",
         "metadata": {"type": "router", "role": "router", "url": f"http://{HOST}:1"}},
    ]
    now = [time.time()]
    async with aiohttp.ClientSession() as session:
        for rec in records:
            async with session.post(reg_url + "/services", json=rec) as resp:
                assert resp.status == 201
        poller = Poller(session, reg_url, clock=lambda: now[0])
        snap = await poller.poll()
        b = snap.service("b-server")
        assert (b.requests, b.errors, b.in_flight, b.restarts, b.migrations) == (400, 3, 3, 4, 3)
        assert b.latency.p50 == (100 * 10.0 + 300 * 20.0) / 400
        assert b.cache_hit == (100 * 3 + 300 * 2) / (1000 + 3000)   # tokens summed over routers
        assert snap.routers_answered == 2 and len(snap.router_errors) == 1 and ":1" in snap.router_errors[0]
        sitter = snap.service("b")
        assert sitter.models == ("m1",) and sitter.restarts == 4      # taken from its backend
        assert [(m.name, m.requests, m.healthy, m.backends) for m in snap.models] == [("m1", 400, 1, ("b-server",))]
        assert snap.models[0].cache_hit == 0.2

        r1_body["stats"] = _stats({"b-server": (150, 2, 0, 10.0)}, {"m1": 150})
        r2_body["stats"] = _stats({"b-server": (350, 1, 0, 20.0)}, {"m1": 350})
        now[0] += 200.0                      # heartbeats now look 200 s old to the console
        async with session.delete(reg_url + "/services/b") as resp:
            assert resp.status == 200
        snap = await poller.poll()
        assert snap.models[0].rate == 100 / 200.0
        assert snap.history["b-server"][-1].rate == 100 / 200.0
        assert snap.service("b-server").state == "stale"
        assert snap.service("b").state == "gone"             # deregistered: shown a while as gone
        assert snap.registered == len(records) - 1             # and no longer counted


async def test_deregistered_is_gone_expired_is_expired_and_only_registered_ones_count(aiohttp_server):
    """A clean deregistration shows `gone` (no frozen heartbeat); a lapsed heartbeat shows `expired`."""
    cfg = RegistryConfig(bind=HOST, port=0, sweep_interval=0.1, heartbeat_ttl=0.3, expire_after=1.5)
    registry = await aiohttp_server(create_registry(cfg), host=HOST)
    reg_url = f"http://{HOST}:{registry.port}"
    base = {"host": HOST, "hostname": HOST, "status": "running", "metadata": {"role": "babysitter"}}
    async with aiohttp.ClientSession() as session:
        for name, port in (("leaver", 9001), ("lapsed", 9002), ("stayer", 9003)):
            async with session.post(reg_url + "/services",
                                    json={**base, "name": name, "port": port, "url": f"http://x:{port}"}) as resp:
                assert resp.status == 201
        poller = Poller(session, reg_url)
        snap = await poller.poll()
        assert {s.state for s in snap.services} == {"running"} and snap.registered == 3
        async with session.delete(reg_url + "/services/leaver") as resp:
            assert resp.status == 200

        def lapsed_is(state: str):
            async def check():
                async with session.post(reg_url + "/services/stayer/heartbeat", json={"status": "running"}):
                    pass
                got = await poller.poll()
                return got if got.service("lapsed").state == state else None
            return check
        snap = await async_wait_for(lapsed_is("stale"), what="lapsed marked stale")
        assert snap.service("leaver").state == "gone" and snap.service("leaver").heartbeat_age is None

        snap = await async_wait_for(lapsed_is("expired"), what="lapsed expired by the registry")
        assert snap.service("leaver").state == "gone"
        assert snap.registered == 1 and snap.service("stayer").state == "running"


async def test_poll_tells_per_backend_whether_the_routers_route_to_it_and_why_not(aiohttp_server):
    """Each backend row carries the routers' verdict: routable, or why not (circuit, health, registry)."""
    registry = await aiohttp_server(create_registry(RegistryConfig(bind=HOST, port=0)), host=HOST)
    reg_url = f"http://{HOST}:{registry.port}"
    stats = _stats({"ok": (1, 0, 0, 1.0), "open": (9, 9, 0, 1.0), "sick": (0, 0, 0, 1.0)}, {"m": 10, "(none)": 3})
    verdicts = {
        "ok": {"healthy": True, "registry_healthy": True, "active_healthy": True, "circuit": "closed"},
        "open": {"healthy": False, "registry_healthy": True, "active_healthy": True, "circuit": "open",
                 "circuit_retry_in": 7.5},
        "sick": {"healthy": False, "registry_healthy": True, "active_healthy": False, "circuit": "closed"},
    }
    for entry in stats["services"]:
        entry.update(verdicts[entry["name"]])
    router = await _router(aiohttp_server, {"stats": stats})
    base = {"host": HOST, "hostname": HOST, "status": "running"}
    records = [{**base, "name": n, "port": 9100 + i, "url": f"http://x:{9100 + i}",
                "metadata": {"type": "openai-api", "role": "backend", "models": ["m"]}}
               for i, n in enumerate(("ok", "open", "sick", "unknown"))]
    records.append({**base, "name": "router", "port": router.port, "url": f"http://{HOST}:{router.port}",
                    "metadata": {"type": "router", "role": "router", "url": f"http://{HOST}:{router.port}"}})
    async with aiohttp.ClientSession() as session:
        for rec in records:
            async with session.post(reg_url + "/services", json=rec) as resp:
                assert resp.status == 201
        snap = await Poller(session, reg_url).poll()
    routes = {n: snap.service(n).route for n in ("ok", "open", "sick", "unknown")}
    assert routes["ok"].ok and not routes["open"].ok
    assert (routes["open"].reason, routes["open"].retry_in) == ("circuit open", 7.5)
    assert routes["sick"].reason == "health check failing"
    assert routes["unknown"].reason == "not in the routers' table"
    assert snap.service("router").route is None
    assert [m.name for m in snap.models] == ["m"]                 # "(none)" is not a model


async def test_babysitter_action_reports_refusal(aiohttp_server):
    """A babysitter answering 401 to /restart is reported as a failed action with its message."""
    async def restart(request):
        if request.headers.get("Authorization") != "Bearer right":
            return web.json_response({"error": {"message": "bad token", "type": "auth", "code": 401}}, status=401)
        return web.json_response({"message": "restarting"})
    app = web.Application()
    app.router.add_post("/restart", restart)
    srv = await aiohttp_server(app, host=HOST)
    async with aiohttp.ClientSession() as session:
        url = f"http://{HOST}:{srv.port}"
        with pytest.raises(BabysitterError, match=r"restart refused \(401\): bad token"):
            await BabysitterClient(session, "wrong").act(url, "restart")
        assert await BabysitterClient(session, "right").act(url, "restart") == "restarting"


async def test_models_count_errors_like_their_backends_and_remember_a_lost_backend(aiohttp_server):
    """A model's ERRS is its backends' sum; a backend that left shows as lost and not in healthy/total."""
    registry = await aiohttp_server(create_registry(RegistryConfig(bind=HOST, port=0)), host=HOST)
    reg_url = f"http://{HOST}:{registry.port}"
    stats = _stats({"a": (10, 1, 0, 1.0), "c": (20, 2, 0, 1.0)}, {"model-1": 31})
    stats["models"]["model-1"]["error_count"] = 9        # the router's own count (it also counts retries)
    router = await _router(aiohttp_server, {"stats": stats})
    base = {"host": HOST, "hostname": HOST, "status": "running"}
    records = [{**base, "name": n, "port": 9100 + i, "url": f"http://x:{9100 + i}",
                "metadata": {"type": "openai-api", "role": "backend", "models": ["model-1"]}}
               for i, n in enumerate(("a", "c"))]
    records.append({**base, "name": "router", "port": router.port, "url": f"http://{HOST}:{router.port}",
                    "metadata": {"type": "router", "role": "router", "url": f"http://{HOST}:{router.port}"}})
    async with aiohttp.ClientSession() as session:
        for rec in records:
            async with session.post(reg_url + "/services", json=rec) as resp:
                assert resp.status == 201
        poller = Poller(session, reg_url)
        (m,) = (await poller.poll()).models
        assert (m.requests, m.errors, m.healthy, m.backends, m.lost) == (30, 3, 2, ("a", "c"), ())
        async with session.delete(reg_url + "/services/c") as resp:
            assert resp.status == 200
        (m,) = (await poller.poll()).models
        assert (m.healthy, m.backends, m.lost) == (1, ("a",), ("c",))


def test_an_engine_that_reports_no_cache_shows_no_hit_ratio():
    """The mock (and many engines) report usage without cached tokens: CACHE% is '-', not 0.0."""
    from console.poller import _Sum

    quiet, cached = _Sum(), _Sum()
    quiet.add({"request_count": 5, "tokens": {"prompt": 50, "completion": 5, "cached": None}})
    cached.add({"request_count": 5, "tokens": {"prompt": 50, "completion": 5, "cached": 20}})
    assert quiet.cache_hit() is None and cached.cache_hit() == 0.4
