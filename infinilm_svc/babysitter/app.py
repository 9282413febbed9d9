"""The babysitter role: supervises one backend and serves its HTTP API on port P+1."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..auth import KeyRing
from ..background import TaskSupervisor
from ..config.babysitter import BabysitterConfig
from ..errors import ApiError, error_middleware, expect_continue
from ..runtime import FORCE_EXIT_HOOKS
from ..wire import dumps, json_response
from .logbook import LogBook, LogFile, LogLine
from .metrics import make_metrics
from .registration import Registration
from .supervisor import RUNNING, Supervisor

log = logging.getLogger(__name__)

CONFIG = web.AppKey("babysitter_config", BabysitterConfig)
LOGBOOK = web.AppKey("babysitter_logbook", LogBook)
SUPERVISOR = web.AppKey("babysitter_supervisor", Supervisor)
REGISTRATION = web.AppKey("babysitter_registration", Registration)
STARTED = web.AppKey("babysitter_started", float)
METRICS = web.AppKey("babysitter_metrics", CollectorRegistry)
TASKS = web.AppKey("babysitter_tasks", TaskSupervisor)
KEYS = web.AppKey("babysitter_keys", KeyRing)


def log_path(config: BabysitterConfig) -> str:
    """The backend's log file: log_file, or <name>.log in log_dir (both resolved when the file was read)."""
    policy = config.babysitter
    return policy.log_file or os.path.join(policy.log_dir, f"{config.service_name}.log")


async def _supervision(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the HTTP session, then the supervisor and the registration built on it; start
    them; on exit deregister, stop the child and close the session."""
    config, logbook, tasks = app[CONFIG], app[LOGBOOK], app[TASKS]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16, force_close=True))
    try:
        supervisor = app[SUPERVISOR] = Supervisor(config, logbook, session,
                                                  pid_file=os.path.splitext(log_path(config))[0] + ".pid")
        supervisor.listeners.append(lambda state: log.info("%s: backend %s", config.service_name, state))
        registration = None
        if config.registry_url:
            registration = app[REGISTRATION] = Registration(config, supervisor, session)
            supervisor.listeners.append(registration.poke)
        app[METRICS] = make_metrics(supervisor, logbook, registration)
        app[FORCE_EXIT_HOOKS] = [supervisor.kill_now]
        supervisor.start(tasks)
        if registration is not None:
            registration.start(tasks)
        try:
            yield
        finally:
            if registration is not None:
                await registration.close()
            await supervisor.close()
    finally:
        await tasks.close()
        await session.close()
        logbook.close()


async def _end_followers(app: web.Application) -> None:
    app[LOGBOOK].close_followers()


# --- handlers ----------------------------------------------------------------------------------

def _health_body(request: web.Request) -> dict:
    config, sup = request.app[CONFIG], request.app[SUPERVISOR]
    running = sup.state == RUNNING
    return {"status": "healthy" if running else "unhealthy", "service": config.service_name,
            "babysitter": "enhanced", "infinilm_server_running": running,
            "infinilm_server_port": config.port if running else None,
            "timestamp": int(time.time()), "state": sup.state, "tasks": request.app[TASKS].report()}


async def health(request: web.Request) -> web.Response:
    body = _health_body(request)
    return json_response(body, status=200 if body["infinilm_server_running"] else 503)


async def info(request: web.Request) -> web.Response:
    config, sup = request.app[CONFIG], request.app[SUPERVISOR]
    return json_response({
        "name": config.service_name, "host": config.host, "port": config.api_port,
        "url": f"http://{config.host}:{config.api_port}", "service_type": config.backend.type,
        "infinilm_server_port": config.port if sup.state == RUNNING else None,
        "uptime": round(time.time() - request.app[STARTED], 3), "restart_count": sup.restarts,
        "state": sup.state, "backend": config.server_name, "metadata": dict(config.metadata),
    })


async def status(request: web.Request) -> web.Response:
    body = request.app[SUPERVISOR].status()
    reg = request.app.get(REGISTRATION)
    body["registry"] = None if reg is None else {
        "url": reg.client.url, "urls": reg.client.urls, "failovers": reg.client.failovers,
        "last_failover": reg.client.last_failover,
        "registered": reg.registered, "last_ok": reg.last_ok, "last_error": reg.last_error,
        "heartbeat_interval": reg.interval, "heartbeat_ttl": reg.client.heartbeat_ttl, "warning": reg.ttl_warning,
        "overwritten": reg.overwritten}
    return json_response(body)


async def models(request: web.Request) -> web.Response:
    """The backend's own model list, fetched now; 503 when it does not answer."""
    sup = request.app[SUPERVISOR]
    for path in ("/v1/models", "/models"):
        body = await sup.get_json(path)
        if body is not None:
            return json_response(body)
    if sup.config.backend.health_path and sup.models_list and sup.state == RUNNING:
        return json_response({"object": "list", "data": sup.models_list})
    raise ApiError(503, f"backend is {sup.state} and does not answer its model list", "server_error",
                   code="backend_unavailable")


def _check_token(request: web.Request) -> None:
    if not request.app[KEYS].allows(request.headers.get("Authorization")):
        raise ApiError(401, "this babysitter needs Authorization: Bearer <token>", code="invalid_token",
                       headers={"WWW-Authenticate": "Bearer"})


async def _command(request: web.Request, what: str) -> web.Response:
    _check_token(request)
    sup = request.app[SUPERVISOR]
    sup.logbook.marker(f"{what} requested over HTTP")
    getattr(sup, f"request_{what}")()
    await asyncio.sleep(0)  # let the supervisor take the request before answering
    return json_response({"message": f"{what} requested", "name": sup.config.service_name,
                              "state": sup.state}, status=202)


async def restart(request: web.Request) -> web.Response:
    return await _command(request, "restart")


async def stop(request: web.Request) -> web.Response:
    return await _command(request, "stop")


async def start(request: web.Request) -> web.Response:
    return await _command(request, "start")


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}", code="invalid_parameter") from None
    if value < 0:
        raise ApiError(400, f"{name} must be >= 0, got {value}", code="invalid_parameter")
    return value


FOLLOW_WRITE_TIMEOUT = 60.0   # seconds a /logs follower may leave a write unread before it is dropped


def _sse(entry: LogLine) -> bytes:
    return b"data: " + dumps(entry.as_dict()).encode() + b"\n\n"


async def logs(request: web.Request) -> web.StreamResponse:
    _check_token(request)  # backend logs can hold prompts
    book = request.app[LOGBOOK]
    follow = request.query.get("follow", "").lower() in ("1", "true", "yes")
    if not follow:
        tail = _int_param(request, "tail", 100)
        return json_response({"name": book.name, "lines": [e.as_dict() for e in book.tail(tail)]})
    tail = _int_param(request, "tail", 0)
    lines, follower = book.follow(tail)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        if lines:
            await _write(resp, b"".join(map(_sse, lines)))
        while True:
            try:
                e = await asyncio.wait_for(follower.get(), 15.0)
            except asyncio.TimeoutError:
                await _write(resp, b": keep-alive\n\n")
                continue
            chunk = []
            while e is not None:  # send what piled up in one write; None = the stream ends
                chunk.append(_sse(e))
                if follower.empty():
                    break
                e = follower.get_nowait()
            if chunk:
                await _write(resp, b"".join(chunk))
            if e is None:
                break
    except (ConnectionResetError, asyncio.CancelledError, asyncio.TimeoutError):
        pass
    finally:
        book.unfollow(follower)
    return resp


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    """A write to a follower that stops reading gives up after FOLLOW_WRITE_TIMEOUT."""
    await asyncio.wait_for(resp.write(data), FOLLOW_WRITE_TIMEOUT)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[METRICS]),
                        headers={"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"})


def create_app(config: BabysitterConfig) -> web.Application:
    """The babysitter's app; supervision runs in its cleanup_ctx (starts with the app, stops with it)."""
    app = web.Application(middlewares=[error_middleware])
    app[CONFIG] = config
    app[STARTED] = time.time()
    app[TASKS] = TaskSupervisor("babysitter")
    app[KEYS] = KeyRing([config.token] if config.token else [])
    policy = config.babysitter
    try:
        file = LogFile(log_path(config), policy.log_max_bytes, policy.log_backups)
    except OSError as exc:
        log.warning("%s: no log file (%s); keeping the in-memory log only", config.service_name, exc)
        file = None
    app[LOGBOOK] = LogBook(config.service_name, policy.log_ring_lines, file, policy.log_ring_bytes)
    # The supervisor, the registration and the metrics need the HTTP session: _supervision
    # creates it at startup, then them (before any request is served).
    app.cleanup_ctx.append(_supervision)
    app.on_shutdown.append(_end_followers)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/info", info)
    r.add_get("/status", status)
    r.add_get("/models", models)
    r.add_get("/v1/models", models)
    r.add_get("/logs", logs)
    r.add_get("/metrics", metrics)
    r.add_post("/restart", restart, expect_handler=expect_continue)
    r.add_post("/stop", stop, expect_handler=expect_continue)
    r.add_post("/start", start, expect_handler=expect_continue)
    return app
