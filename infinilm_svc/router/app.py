"""The router role: an OpenAI-compatible front door over the registry's healthy backends."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..client.registry import RegistryClient
from ..config.router import RouterConfig
from ..errors import error_middleware
from .balancer import make_policy
from .discovery import Discovery, deregister, keep_registered, router_record
from .health import Health
from .proxy import Proxy
from .stats import make_registry
from .table import Table
from .upstream import Pool

log = logging.getLogger(__name__)

CONFIG = web.AppKey("router_config", RouterConfig)
TABLE = web.AppKey("router_table", Table)
HEALTH = web.AppKey("router_health", Health)
DISCOVERY = web.AppKey("router_discovery", Discovery)
PROXY = web.AppKey("router_proxy", Proxy)
SESSION = web.AppKey("router_session", aiohttp.ClientSession)

_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data), content_type=_JSON)


async def handle_health(request: web.Request) -> web.Response:
    """Always 200 (upstream shape); `status` is "healthy" when at least one backend is routable."""
    return _json(request.app[TABLE].health_json())


async def handle_models(request: web.Request) -> web.Response:
    """The models of the routable backends, deduplicated (precomputed on membership changes)."""
    return web.Response(body=request.app[TABLE].models_body, content_type=_JSON)


async def handle_v1_models(request: web.Request) -> web.Response:
    request.app[PROXY].check_key(request)
    return web.Response(body=request.app[TABLE].models_body, content_type=_JSON)


async def handle_services(request: web.Request) -> web.Response:
    t = request.app[TABLE]
    services = [b.to_json() for b in t.backends.values()]
    return _json({"services": services, "total": len(services), "registry_url": t.registry_url})


async def handle_stats(request: web.Request) -> web.Response:
    t = request.app[TABLE]
    services = [b.to_json() for b in t.backends.values()]
    return _json({
        "total_services": len(services),
        "healthy_services": t.routable_count,
        "registry_url": t.registry_url,
        "registry_reachable": t.registry_ok,
        "services": services,
        "models": {m or "(none)": c.to_json() for m, c in t.model_stats.items() if m or c.request_count},
    })


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    app[SESSION] = session
    pool = Pool(config.connect_timeout, config.read_timeout)
    app[PROXY].pool = pool
    tasks: list[asyncio.Task] = []
    registry = None
    record = None
    try:
        app[DISCOVERY].load_static()
    except (OSError, ValueError) as exc:
        log.error("static services file: %s", exc)
    if config.registry_url:
        registry = RegistryClient(session, config.registry_url, config.registry_token, timeout=5.0)
        tasks.append(asyncio.create_task(app[DISCOVERY].watch(registry), name="router-registry-watch"))
        record = router_record(config)
        tasks.append(asyncio.create_task(keep_registered(registry, record, config.heartbeat_interval),
                                         name="router-registration"))
    tasks.append(asyncio.create_task(app[HEALTH].run(session), name="router-health"))
    try:
        yield
    finally:
        for task in tasks:
            await _cancel(task)
        if registry is not None and record is not None:
            await deregister(registry, record["name"])
        for b in app[TABLE].backends.values():
            app[HEALTH].forget(b)
        pool.close()
        await session.close()
        if app[PROXY].access is not None:
            app[PROXY].access.flush()  # lines of the last loop turn


def create_app(config: RouterConfig) -> web.Application:
    """The router app: local endpoints, the catch-all proxy, discovery and health loops."""
    # No app middleware: each route is wrapped in error_middleware itself, which spares every proxied
    # request aiohttp's middleware chain (a cached-chain lookup and its current_app wrapper).
    app = web.Application(client_max_size=config.max_body)
    policies: dict[str, object] = {}

    def policy_for(model: str) -> object:
        name = config.model_policies.get(model, config.policy)
        if name not in policies:
            policies[name] = make_policy(name, config)
        return policies[name]

    table = Table(policy_for, config.registry_url)
    health = Health(config, table)
    app[CONFIG] = config
    app[TABLE] = table
    app[HEALTH] = health
    app[DISCOVERY] = Discovery(config, table, health)
    app[PROXY] = Proxy(config, table, health)
    metrics_registry = make_registry(table)

    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics_registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    table.rebuild()
    app.cleanup_ctx.append(_lifecycle)
    r = app.router
    for path, handler in (("/health", handle_health), ("/status", handle_health), ("/models", handle_models),
                          ("/v1/models", handle_v1_models), ("/services", handle_services),
                          ("/stats", handle_stats), ("/metrics", handle_metrics)):
        r.add_get(path, enveloped(handler), allow_head=False)
    r.add_route("*", "/{tail:.*}", enveloped(app[PROXY].handle))
    return app


def enveloped(handler: Handler) -> Handler:
    """`handler` with every error answered in the OpenAI envelope (error_middleware, per route)."""
    return functools.partial(error_middleware, handler=handler)
