"""The router role: an OpenAI-compatible front door over the registry's healthy backends."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from ..auth import KeyRing
from ..background import TaskSupervisor
from ..client.registry import RegistryClient
from ..config.router import RouterConfig
from ..errors import ApiError
from ..looplag import LoopLag
from ..runtime import KEEPALIVE_DRAIN, REQUEST_HANDLER, REUSE_PORT, SHUTDOWN_TIMEOUT
from ..wire import dumps, json_response
from .balancer import Policy, make_policy
from .discovery import Discovery, deregister, keep_registered, router_record
from .frontdoor import FrontDoor
from .health import Health
from .metrics import CONTENT_TYPE, SLICE, Exposition
from .pool import Pool
from .proxy import Proxy
from .queueing import Scheduler
from .table import Backend, Table

log = logging.getLogger(__name__)

CONFIG = web.AppKey("router_config", RouterConfig)
TABLE = web.AppKey("router_table", Table)
HEALTH = web.AppKey("router_health", Health)
DISCOVERY = web.AppKey("router_discovery", Discovery)
PROXY = web.AppKey("router_proxy", Proxy)
SESSION = web.AppKey("router_session", aiohttp.ClientSession)
TASKS = web.AppKey("router_tasks", TaskSupervisor)
LAG = web.AppKey("router_loop_lag", LoopLag)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
FIRST_SYNC_WAIT = 5.0   # seconds a starting router waits for the registry's table before it listens


def admin_only(config: RouterConfig, handler: Handler) -> Handler:
    """`handler` behind the admin keys (or, without any, the API keys) when keys are set: the
    router's tables reveal backend URLs, pids and metadata."""
    keys = config.admin_keys or config.api_keys
    if not keys:
        return handler
    ring = KeyRing(keys)
    kind = "an admin key" if config.admin_keys else "an API key"

    async def checked(request: web.BaseRequest) -> web.StreamResponse:
        if not ring.allows(request.headers.get("Authorization")):
            raise ApiError(401, f"this endpoint needs {kind} (send Authorization: Bearer <key>)",
                           "invalid_request_error", "invalid_api_key")
        return await handler(request)
    return checked


async def stream_json(request: web.BaseRequest, head: dict, key: str, items: list, to_json: Callable,
                      tail: dict | None = None) -> web.StreamResponse:
    """A JSON object whose `key` holds a long list, written SLICE items at a time with the event
    loop free in between (a table of 10,000 backends in one go would hold it for a good while)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    opening = dumps(head)
    with contextlib.suppress(ConnectionResetError):   # the client left: nothing to finish
        await resp.write(f'{opening[:-1]}{"," if head else ""}"{key}":['.encode())
        for i in range(0, len(items), SLICE):
            part = ",".join(dumps(to_json(x)) for x in items[i:i + SLICE])
            await resp.write(("," + part if i else part).encode())
            await asyncio.sleep(0)
        closing = dumps(tail or {})
        await resp.write(f"]{',' + closing[1:] if tail else '}'}".encode())
        await resp.write_eof()
    return resp


def local_endpoints(table: Table, proxy: Proxy, tasks: TaskSupervisor, lag: LoopLag) -> dict[str, Handler]:
    def queues() -> dict:
        return {("/".join(k for k in key if k) or "(none)"): q.to_json() for key, q in proxy.scheduler.queues.items()
                if q.tenants or q.waiting}

    """The router's own GET endpoints, by path (everything else is proxied)."""

    async def health(request: web.BaseRequest) -> web.Response:
        """Always 200 (upstream shape); `status` is "healthy" when at least one backend is routable,
        "degraded" while one of the router's own loops is waiting to be restarted."""
        body = table.health_json()
        body["tasks"] = tasks.report()
        body["event_loop_lag"] = lag.to_json()
        if tasks.degraded:
            body["status"] = "degraded"
        return json_response(body)

    async def models(request: web.BaseRequest) -> web.Response:
        """The models of the routable backends, deduplicated (precomputed on membership changes)."""
        return web.Response(body=table.models_body, content_type="application/json")

    async def v1_models(request: web.BaseRequest) -> web.Response:
        proxy.check_key(request)
        return web.Response(body=table.models_body, content_type="application/json")

    async def services(request: web.BaseRequest) -> web.StreamResponse:
        listed = list(table.backends.values())
        return await stream_json(request, {}, "services", listed, Backend.to_json,
                                 {"total": len(listed), "registry_url": table.registry_url})

    async def stats(request: web.BaseRequest) -> web.StreamResponse:
        listed = list(table.backends.values())
        return await stream_json(request, {
            "total_services": len(listed),
            "healthy_services": table.routable_count,
            "registry_url": table.registry_url,
            "registry_reachable": table.registry_ok,
            "event_loop_lag": lag.to_json(),
        }, "services", listed, Backend.to_json, {
            "models": {m or "(none)": c.to_json() for m, c in table.model_stats.items() if m or c.request_count},
            "queues": queues(),
        })

    return {"/health": health, "/status": health, "/models": models, "/v1/models": v1_models,
            "/services": services, "/stats": stats}


async def _cancel(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Registration:
    """The router's own registry record and the task keeping it, so a stop can withdraw it early."""

    def __init__(self) -> None:
        self.registry: RegistryClient | None = None
        self.name: str | None = None
        self.task: asyncio.Task | None = None

    async def withdraw(self) -> None:
        """Stop heartbeating and deregister (once): the first thing a stopping router does."""
        task, self.task = self.task, None
        await _cancel(task)
        if self.registry is not None and self.name is not None:
            name, self.name = self.name, None
            await deregister(self.registry, name)


REGISTRATION = web.AppKey("router_registration", Registration)


async def _withdraw(app: web.Application) -> None:
    # on_shutdown: after the listener closed, before in-flight requests are waited for.
    await app[REGISTRATION].withdraw()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    app[SESSION] = session
    pool = app[PROXY].pool
    tasks = app[TASKS]
    try:
        app[DISCOVERY].load_static()
    except (OSError, ValueError) as exc:
        log.error("static services file: %s", exc)
    if config.registry_url:
        registry = RegistryClient(session, config.registry_url, config.registry_token, timeout=5.0)
        tasks.spawn("registry-watch", lambda: app[DISCOVERY].watch(registry))
        # Listen (and register) only once the registry's table is in (or the registry could not be
        # reached, or FIRST_SYNC_WAIT has passed): a new router of a rolling restart takes
        # connections the moment it listens, and with an empty table it would answer them 503.
        try:
            await asyncio.wait_for(app[DISCOVERY].first_try.wait(), FIRST_SYNC_WAIT)
        except asyncio.TimeoutError:
            log.warning("no answer from the registry within %gs; serving while it is tried again", FIRST_SYNC_WAIT)
        record = router_record(config)
        reg = app[REGISTRATION]
        reg.registry, reg.name = registry, record["name"]
        reg.task = tasks.spawn("registration", lambda: keep_registered(registry, record, config.heartbeat_interval)).task
    tasks.spawn("health-checks", app[HEALTH].run)
    tasks.spawn("loop-lag", app[LAG].run)
    try:
        yield
    finally:
        await app[REGISTRATION].withdraw()
        await tasks.close()
        for b in app[TABLE].backends.values():
            app[HEALTH].forget(b)
        pool.close()
        await session.close()
        if (access := app[PROXY].access) is not None:
            access.flush()  # lines of the last loop turn


def create_app(config: RouterConfig) -> web.Application:
    """The router app: its startup and cleanup (discovery, health, registration, the upstream pool).

    Requests are not served by the app's own router: `REQUEST_HANDLER` gives the runtime the front
    door's handler, which sends every path other than the local endpoints to the proxy.
    """
    app = web.Application(client_max_size=config.max_body)
    policies: dict[str, Policy] = {}

    def policy_for(model: str) -> Policy:
        name = config.model_policies.get(model, config.policy)
        if name not in policies:
            policies[name] = make_policy(name, config, lambda b, done: health.read_props(b, done))
        return policies[name]

    table = Table(policy_for, config.registry_url)
    pool = Pool(config.connect_timeout, config.read_timeout, config.upstream_idle_timeout, config.upstream_max_idle)
    health = Health(config, table, pool)
    scheduler = Scheduler(config)
    proxy = Proxy(config, table, health, pool, scheduler)
    app[CONFIG] = config
    app[TABLE] = table
    app[HEALTH] = health
    app[DISCOVERY] = Discovery(config, table, health, scheduler.freed)
    app[PROXY] = proxy
    lag = app[LAG] = LoopLag()
    exposition = Exposition(table, health, lag, scheduler)

    async def metrics(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):   # the scraper left: nothing to finish
            async for chunk in exposition.chunks():
                await resp.write(chunk)
            await resp.write_eof()
        return resp

    table.rebuild()
    app.cleanup_ctx.append(_lifecycle)
    door = FrontDoor(proxy, table, config.max_body)
    tasks = app[TASKS] = TaskSupervisor("router")
    local = local_endpoints(table, proxy, tasks, lag)
    for path in ("/services", "/stats"):
        local[path] = admin_only(config, local[path])
    local["/metrics"] = metrics if config.public_metrics else admin_only(config, metrics)
    for path, handler in local.items():
        door.add_local(path, handler)
    app[REQUEST_HANDLER] = door
    # A stop withdraws the registration, closes the listener and lets in-flight requests and
    # streams finish for up to drain_timeout; with reuse_port a new router can already serve the port.
    app[REGISTRATION] = Registration()
    app.on_shutdown.append(_withdraw)
    app[SHUTDOWN_TIMEOUT] = config.drain_timeout
    app[REUSE_PORT] = config.reuse_port
    app[KEEPALIVE_DRAIN] = config.keepalive_drain
    return app
