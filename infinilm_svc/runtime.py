"""Hosts several roles (aiohttp apps) in one event loop, with graceful shutdown on signals."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable

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


class StartupError(Exception):
    """A role could not start (port taken, bad address, failed startup hook)."""


async def start_app(hosted: HostedApp) -> web.AppRunner:
    """Run the app's startup (cleanup_ctx) and open its listening socket."""
    # handler_cancellation: a client that goes away cancels its handler at once, so the router
    # closes the backend connection (and generation stops) without waiting for its next write.
    runner = web.AppRunner(hosted.app, handle_signals=False, access_log=None, shutdown_timeout=5.0,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, hosted.bind, hosted.port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"{hosted.role} {hosted.name}: cannot listen on {hosted.bind}:{hosted.port}: {exc.strerror or exc}") from exc
    log.info("%s %s listening on http://%s:%d", hosted.role, hosted.name, hosted.bind, hosted.port)
    return runner


async def serve(apps: list[HostedApp], stop: asyncio.Event | None = None,
                on_listening: Callable[[], None] | None = None) -> int:
    """Start every app in order, wait for a stop signal, then shut them down in reverse order.

    `on_listening` runs once every app listens (so a "serving on ..." line is never a promise).
    """
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
        if on_listening is not None:
            on_listening()
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
