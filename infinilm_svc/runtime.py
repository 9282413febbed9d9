"""Hosts several roles (aiohttp apps) in one event loop, with graceful shutdown on signals."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol

from aiohttp import web

log = logging.getLogger(__name__)


@dataclass
class HostedApp:
    """One role's app and where it listens."""

    role: str          # "registry", "router", "babysitter", "mock"
    name: str
    app: web.Application
    bind: str
    port: int


# Callables a role registers on its app to run when a second signal forces the exit (no awaiting
# is possible then): the babysitter KILLs its backend's process group so nothing is orphaned.
FORCE_EXIT_HOOKS = web.AppKey("force_exit_hooks", list)


class RequestHandler(Protocol):
    """What a role gives to serve its requests itself (aiohttp's low-level handler and factory)."""

    def dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]: ...

    def make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest: ...


# How long a role's in-flight requests may run on after a stop signal (default 5 s), and whether
# its listening socket is opened with SO_REUSEPORT so a new process can bind the same port while
# this one drains (the router sets both).
SHUTDOWN_TIMEOUT = web.AppKey("shutdown_timeout", float)
REUSE_PORT = web.AppKey("reuse_port", bool)
_LATE_REQUEST_GRACE = 0.5   # seconds between closing a draining role's listener and its idle connections

# A role whose app holds a RequestHandler here is served by it instead of the app's route table
# (the router does this for its proxy path); the app still owns startup and cleanup.
REQUEST_HANDLER = web.AppKey("request_handler", RequestHandler)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner, serving with the app's own RequestHandler when it declares one."""

    async def cleanup(self) -> None:
        if self.app.get(REUSE_PORT):
            # Stop listening first, then give connections accepted in the last moment time to send
            # their request before aiohttp closes every connection that has none in progress.
            for site in list(self.sites):
                await site.stop()
            await asyncio.sleep(_LATE_REQUEST_GRACE)
        await super().cleanup()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler = self.app.get(REQUEST_HANDLER)
        if handler is not None:
            server.request_handler = handler.dispatch
            server.request_factory = handler.make_request
        return server


class StartupError(Exception):
    """A role could not start (port taken, bad address, failed startup hook)."""


async def start_app(hosted: HostedApp) -> AppRunner:
    """Run the app's startup (cleanup_ctx) and open its listening socket."""
    # handler_cancellation: a client that goes away cancels its handler at once, so the router
    # closes the backend connection (and generation stops) without waiting for its next write.
    runner = AppRunner(hosted.app, handle_signals=False, access_log=None,
                       shutdown_timeout=hosted.app.get(SHUTDOWN_TIMEOUT, 5.0), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, hosted.bind, hosted.port, reuse_address=True,
                           reuse_port=hosted.app.get(REUSE_PORT, False) or None)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"{hosted.role} {hosted.name}: cannot listen on {hosted.bind}:{hosted.port}: {exc.strerror or exc}") from exc
    log.info("%s %s listening on http://%s:%d", hosted.role, hosted.name, hosted.bind, hosted.port)
    return runner


async def serve(apps: list[HostedApp], stop: asyncio.Event | None = None) -> int:
    """Start every app in order, wait for a stop signal, then shut them down in reverse order."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("received %s: shutting down (send it again to force exit)", signal.Signals(signum).name)
            stop.set()
        else:
            log.warning("second signal: forcing exit")
            for hosted in apps:
                for hook in hosted.app.get(FORCE_EXIT_HOOKS, ()):
                    try:
                        hook()
                    except Exception:  # noqa: BLE001 - exiting anyway
                        log.exception("force-exit hook failed")
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    runners: list[web.AppRunner] = []
    code = 0
    try:
        for hosted in apps:
            runners.append(await start_app(hosted))
        await stop.wait()
    except StartupError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        for runner in reversed(runners):
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001 - keep shutting the others down
                log.exception("error while shutting down")
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
    return code


def self_command() -> list[str]:
    """The argv prefix that re-runs this program: the pyz when running from it, else the package."""
    import sys
    import zipfile

    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0 and os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        return [sys.executable, argv0]
    return [sys.executable, "-m", "infinilm_svc"]
