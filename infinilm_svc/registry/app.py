"""The registry role: the upstream HTTP API over a ServiceTable, plus watch, auth, state and metrics."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from ..auth import KeyRing
from ..background import TaskSupervisor
from ..config import RegistryConfig
from ..errors import ApiError, error_middleware, expect_continue, read_json_object
from ..wire import json_response
from .metrics import make_metrics, render
from .stores import Store, make_store
from .table import ServiceTable, format_url, rfc3339
from .validation import WILDCARD_HOSTS, check_fields, check_heartbeat, check_metadata_size

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", RegistryConfig)
TABLE = web.AppKey("table", ServiceTable)       # the read side, kept current by the store
STORE = web.AppKey("store", Store)              # the write side: memory or etcd
STARTED = web.AppKey("started", float)
SESSION = web.AppKey("session", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", CollectorRegistry)
TASKS = web.AppKey("tasks", TaskSupervisor)
KEYS = web.AppKey("keys", KeyRing)
CLOSING = web.AppKey("closing", asyncio.Event)  # set at shutdown: parked /epoch waits answer

_WAIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


# -- input checking ----------------------------------------------------------------------------
def _resolve_host(fields: dict, request: web.Request, current: dict | None = None) -> None:
    """A wildcard or empty host means "the address this registration came from"."""
    if "host" not in fields:
        return
    if fields["host"].strip() in WILDCARD_HOSTS:
        peer = request.remote or "127.0.0.1"
        if fields.get("hostname", "").strip() in WILDCARD_HOSTS:
            fields["hostname"] = peer
        fields["host"] = peer
        port = fields.get("port", current["port"] if current else None)
        if port is not None:
            fields["url"] = format_url(peer, port)


def _require_token(request: web.Request) -> None:
    if not request.app[KEYS].allows(request.headers.get("Authorization")):
        raise ApiError(401, "this registry needs 'Authorization: Bearer <token>' for writes",
                       code="invalid_token", headers={"WWW-Authenticate": 'Bearer realm="infinilm-registry"'})


def _parse_wait(raw: str, cap: float) -> float:
    m = _WAIT.match(raw)
    if not m:
        raise ApiError(400, f"invalid wait {raw!r}: use e.g. 30s, 500ms or 2m", code="invalid_query")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    return min(value, cap)


def _json(data: Any, status: int = 200, index: int | None = None) -> web.Response:
    headers = {"X-Registry-Index": str(index)} if index is not None else None
    return json_response(data, status=status, headers=headers)


# -- handlers ----------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    table, store = request.app[TABLE], request.app[STORE]
    tasks = request.app[TASKS]
    return _json({
        "status": "degraded" if store.stale or tasks.degraded else "healthy",
        "registry": "running",
        "tasks": tasks.report(),
        "registered_services": len(table.records),
        "healthy_services": table.healthy_count(),
        "index": table.index,
        "epoch": store.epoch,
        **store.describe(),
        "heartbeat_ttl": request.app[CONFIG].heartbeat_ttl,
        "timestamp": rfc3339(),
    }, index=table.index)


async def list_services(request: web.Request) -> web.Response:
    table = request.app[TABLE]
    cfg = request.app[CONFIG]
    q = request.query
    if "index" in q:
        try:
            index = int(q["index"])
        except ValueError:
            raise ApiError(400, f"invalid index {q['index']!r}: expected an integer", code="invalid_query") from None
        wait = _parse_wait(q["wait"], cfg.max_wait) if "wait" in q else min(30.0, cfg.max_wait)
        await table.wait_change(index, wait)
    healthy = None
    if "healthy" in q:
        healthy = q["healthy"].lower() == "true"
    # The table's identity and index name its state: a watcher that already has it (If-None-Match)
    # gets 304 and no body instead of the whole table again (megabytes, for a large fleet).
    etag = f'W/"{request.app[STORE].epoch}:{table.index}:{q.get("status")}:{healthy}"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"X-Registry-Index": str(table.index), "ETag": etag})
    services = table.select(status=q.get("status"), healthy=healthy)
    resp = _json({"services": services, "total": len(services), "index": table.index,
                  "timestamp": rfc3339()}, index=table.index)
    resp.headers["ETag"] = etag
    return resp


async def register_service(request: web.Request) -> web.Response:
    _require_token(request)
    cfg = request.app[CONFIG]
    fields = check_fields(await read_json_object(request), partial=False, max_metadata=cfg.max_metadata_bytes)
    _resolve_host(fields, request)
    table = request.app[TABLE]
    if fields["name"] not in table.records and len(table.records) >= cfg.max_services:
        raise ApiError(429, f"the registry holds {len(table.records)} services, its limit (max_services)",
                       code="too_many_services")
    rec = await request.app[STORE].register(fields)
    log.info("registered %s at %s (%s)", rec["name"], rec["url"], rec["metadata"].get("type", "?"))
    return _json({"message": f"Service '{rec['name']}' registered successfully",
                  "service": table.view(rec, table.clock()), "heartbeat_ttl": cfg.heartbeat_ttl},
                 status=201, index=table.index)


def _lookup(request: web.Request) -> tuple[str, dict]:
    name = request.match_info["name"]
    rec = request.app[TABLE].records.get(name)
    if rec is None:
        raise ApiError(404, f"Service '{name}' not found", code="service_not_found")
    return name, rec


async def get_service(request: web.Request) -> web.Response:
    _, rec = _lookup(request)
    table = request.app[TABLE]
    return _json(table.view(rec, table.clock()), index=table.index)


async def update_service(request: web.Request) -> web.Response:
    _require_token(request)
    name, current = _lookup(request)
    fields = check_fields(await read_json_object(request), partial=True,
                          max_metadata=request.app[CONFIG].max_metadata_bytes)
    _resolve_host(fields, request, current)
    table = request.app[TABLE]
    rec = await request.app[STORE].update(name, fields)
    if rec is None:
        raise ApiError(404, f"Service '{name}' not found", code="service_not_found")
    return _json({"message": f"Service '{name}' updated successfully",
                  "service": table.view(rec, table.clock())}, index=table.index)


async def delete_service(request: web.Request) -> web.Response:
    _require_token(request)
    name, _ = _lookup(request)
    table = request.app[TABLE]
    if not await request.app[STORE].deregister(name):
        raise ApiError(404, f"Service '{name}' not found", code="service_not_found")
    log.info("deregistered %s", name)
    return _json({"message": f"Service '{name}' unregistered successfully"}, index=table.index)


async def heartbeat(request: web.Request) -> web.Response:
    """Refresh a record; the answer carries the record as held, so its owner can see a hijack."""
    _require_token(request)
    name, rec = _lookup(request)
    cfg = request.app[CONFIG]
    status = metadata = None
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            status, metadata = check_heartbeat(await read_json_object(request))
            if metadata:
                check_metadata_size({**rec["metadata"], **metadata}, cfg.max_metadata_bytes)
    table = request.app[TABLE]
    held = await request.app[STORE].heartbeat(name, status, metadata)
    if held is None:
        raise ApiError(404, f"Service '{name}' not found", code="service_not_found")
    return _json({"message": "Heartbeat received", "timestamp": rfc3339(), "heartbeat_ttl": cfg.heartbeat_ttl,
                  "service": table.view(held, table.clock())}, index=table.index)


def _check_url(rec: dict) -> str:
    md = rec.get("metadata") or {}
    if isinstance(md, dict) and md.get("type") == "openai-api":
        return format_url(rec["host"], rec["port"] + 1)
    return rec["url"]


async def _probe(session: aiohttp.ClientSession, rec: dict, timeout: float) -> bool:
    try:
        async with session.get(_check_url(rec) + "/health", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return False


async def service_health(request: web.Request) -> web.Response:
    name, rec = _lookup(request)
    app = request.app
    ok = await _probe(app[SESSION], rec, app[CONFIG].probe_timeout)
    rec = app[TABLE].records.get(name, rec)
    rec["health_status"] = "healthy" if ok else "unhealthy"
    # Upstream counted a successful probe as a heartbeat; a read must not write (anyone could keep
    # a dead record alive by asking about it), so only the informational health_status changes.
    table = app[TABLE]
    return _json({"service": name, "health_status": rec["health_status"],
                  "is_healthy": table.is_healthy(rec, table.clock()),
                  "last_heartbeat": rec["last_heartbeat"], "timestamp": rfc3339()})


async def stats(request: web.Request) -> web.Response:
    table = request.app[TABLE]
    services = table.select()
    healthy = sum(1 for s in services if s["is_healthy"])
    return _json({
        "total_services": len(services),
        "healthy_services": healthy,
        "unhealthy_services": len(services) - healthy,
        "status_distribution": dict(Counter(s["status"] for s in services)),
        "host_distribution": dict(Counter(s["host"] for s in services)),
        "uptime": round(time.time() - request.app[STARTED], 3),
        "index": table.index,
        "watchers": table.watchers,
        **{k: v for k, v in table.counters.items()},
        "timestamp": rfc3339(),
    })


async def epoch(request: web.Request) -> web.Response:
    """`{"epoch", "closing"}`; with ?wait=30s it answers only when the wait ends or the registry shuts down.

    A babysitter parks one of these: when the registry goes away the answer (or the dropped
    connection) tells it at once, and the next registry's different epoch makes it register again.
    """
    table, store, closing = request.app[TABLE], request.app[STORE], request.app[CLOSING]
    if "wait" in request.query and not closing.is_set():
        wait = _parse_wait(request.query["wait"], request.app[CONFIG].max_wait)
        try:
            await asyncio.wait_for(closing.wait(), wait)
        except asyncio.TimeoutError:
            pass
    return _json({"epoch": store.epoch, "closing": table.closing}, index=table.index)


async def _stamp_epoch(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Registry-Epoch"] = request.app[STORE].epoch


async def _close_watches(app: web.Application) -> None:
    app[TABLE].close_watches()
    app[CLOSING].set()


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- background work ---------------------------------------------------------------------------
async def _probe_loop(app: web.Application) -> None:
    table, cfg, session = app[TABLE], app[CONFIG], app[SESSION]
    limit = asyncio.Semaphore(64)

    async def one(rec: dict) -> None:
        async with limit:
            ok = await _probe(session, rec, cfg.probe_timeout)
        rec["health_status"] = "healthy" if ok else "unhealthy"

    while True:
        await asyncio.sleep(cfg.probe_interval)
        await asyncio.gather(*(one(r) for r in list(table.records.values())), return_exceptions=True)


async def _background(app: web.Application):
    cfg = app[CONFIG]
    app[SESSION] = aiohttp.ClientSession()
    try:
        await app[STORE].start(app[SESSION], app[TASKS])
    except BaseException:
        await app[SESSION].close()
        raise
    tasks = app[TASKS]
    if cfg.probe_interval > 0:
        tasks.spawn("probe", lambda: _probe_loop(app))
    yield
    await tasks.close()
    await app[STORE].close()
    await app[SESSION].close()


def create_app(config: RegistryConfig) -> web.Application:
    """The registry app: upstream endpoints plus watch, token, the store (memory or etcd) and /metrics."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body)
    app[CONFIG] = config
    app[STORE] = make_store(config)
    app[TABLE] = app[STORE].table
    app[STARTED] = time.time()
    app[METRICS] = make_metrics(app[TABLE])
    app[TASKS] = TaskSupervisor("registry")
    app[KEYS] = KeyRing([config.token] if config.token else [])
    app[CLOSING] = asyncio.Event()
    app.cleanup_ctx.append(_background)
    app.on_response_prepare.append(_stamp_epoch)
    app.on_shutdown.append(_close_watches)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/services", list_services)
    r.add_post("/services", register_service, expect_handler=expect_continue)
    r.add_get("/services/{name}", get_service)
    r.add_put("/services/{name}", update_service, expect_handler=expect_continue)
    r.add_delete("/services/{name}", delete_service)
    r.add_post("/services/{name}/heartbeat", heartbeat, expect_handler=expect_continue)
    r.add_get("/services/{name}/health", service_health)
    r.add_get("/stats", stats)
    r.add_get("/metrics", metrics)
    r.add_get("/epoch", epoch)
    return app
