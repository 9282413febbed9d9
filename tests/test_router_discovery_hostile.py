"""Router discovery against a registry that serves records the router cannot use: each is skipped
with one warning, and every later change is still learned (the watch never dies)."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from harness import async_wait_for, free_port
from router_harness import HOST, backend_record, dep  # noqa: F401 (dep: a fixture)


class LaxRegistry:
    """A registry stand-in that serves whatever records it is given (an old or foreign registry)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.index = 1
        self.changed = asyncio.Event()

    def set(self, records: list[dict]) -> None:
        self.records = records
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def services(self, request: web.Request) -> web.Response:
        if int(request.query.get("index", "0")) >= self.index:
            try:
                await asyncio.wait_for(self.changed.wait(), 2.0)
            except asyncio.TimeoutError:
                pass
        return web.json_response({"services": self.records, "total": len(self.records), "index": self.index},
                                 headers={"X-Registry-Index": str(self.index)})

    async def accept(self, request: web.Request) -> web.Response:
        return web.json_response({}, status=201)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/services", self.services)
        app.router.add_route("*", "/services{tail:.*}", self.accept)
        return app


def bad(name: str, **meta) -> dict:
    rec = backend_record(name, 1, ["m"])
    rec["metadata"].update(meta)
    return rec


async def test_bad_records_are_skipped_once_and_discovery_keeps_following(dep, caplog):  # noqa: F811
    lax = LaxRegistry()
    port = free_port()
    await dep.aiohttp_server(lax.app(), host=HOST, port=port)
    dep.registry_url = f"http://{HOST}:{port}"
    a = await dep.start_mock("mock-a", ["m"], register=False)
    b = await dep.start_mock("mock-b", ["m"], register=False)
    good_a = backend_record("mock-a", a, ["m"])
    poison = [bad("bad-int", models=5), bad("bad-bool", models=True), bad("bad-float", models=1.5),
              bad("bad-weight", weight=float("inf")),
              {**backend_record("bad-port", 1, ["m"]), "url": f"http://{HOST}:99999"},
              {**backend_record("bad-scheme", 1, ["m"]), "url": "javascript:alert(1)"},
              {**backend_record("bad-port-type", 1, ["m"]), "url": None, "port": "80"}]
    lax.set([good_a, *poison])
    caplog.set_level(logging.WARNING, logger="infinilm_svc.router.discovery")
    await dep.start_router()
    await dep.wait_routable(1, 1)
    assert await dep.chat("m") == "mock-a"
    # The watch is alive: a backend added after the poison is learned, and one removed is dropped.
    lax.set([good_a, *poison, backend_record("mock-b", b, ["m"])])
    await dep.wait_routable(2, 2)
    lax.set([backend_record("mock-b", b, ["m"]), *poison])
    await dep.wait_routable(1, 1)
    assert await dep.chat("m") == "mock-b"
    skipped = [r.getMessage() for r in caplog.records if "record skipped" in r.getMessage()]
    for rec in poison:
        assert sum(rec["name"] + ":" in m for m in skipped) == 1, (rec["name"], skipped)


async def test_a_record_it_cannot_connect_to_is_retried_elsewhere(dep):  # noqa: F811
    """A backend whose address refuses connections counts as a connect failure and the request is
    retried on another backend; never a 500."""
    await dep.start_mock("mock-a", ["m"])
    await dep.register("dead", 1, ["m"])       # port 1 on loopback: connection refused
    await dep.start_router(policy="round_robin")
    await dep.wait_routable(2)
    for _ in range(10):
        assert await dep.chat("m") == "mock-a"


async def test_a_router_record_the_registry_refuses_is_warned_about_once(dep, caplog):  # noqa: F811
    refusals = []

    async def refuse(request):
        refusals.append(1)
        return web.json_response({"error": {"message": "field 'name' is not allowed", "type": "invalid_request_error",
                                            "code": "invalid_field"}}, status=400)

    lax = LaxRegistry()
    app = lax.app()
    port = free_port()
    app.router.add_post("/refuse/services", refuse)
    await dep.aiohttp_server(app, host=HOST, port=port)
    dep.registry_url = f"http://{HOST}:{port}/refuse"
    caplog.set_level(logging.WARNING, logger="infinilm_svc.router.discovery")
    await dep.start_router()
    await async_wait_for(lambda: _true(len(refusals) >= 4), timeout=10, what="several refused registrations")
    warned = [r.getMessage() for r in caplog.records if "refuses this router's record" in r.getMessage()]
    assert len(warned) == 1 and "field 'name' is not allowed" in warned[0]


async def _true(value: bool) -> bool:
    return value
