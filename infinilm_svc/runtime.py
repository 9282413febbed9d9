"""Hosts several roles (aiohttp apps) in one event loop, with graceful shutdown on signals."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import error_response
from .looplag import freeze_heap

log = logging.getLogger(__name__)

# A connection must send a complete request head within this long of opening, or of its last
# answer; otherwise it is closed. This bounds idle keep-alive connections and slow-header
# ("slowloris") clients alike: aiohttp's keep-alive timer runs while no request has arrived, and
# bytes that do not finish a request head do not reset it.
IDLE_TIMEOUT = 60.0
ACCEPT_ERROR_INTERVAL = 10.0      # accept() failures are summarised at most this often


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


class RoleHandler(Protocol):
    """What a role gives to serve its requests itself (aiohttp's low-level handler and factory)."""

    def dispatch(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]: ...

    def make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest: ...


# How long a role's in-flight requests may run on after a stop signal (default 5 s), and whether
# its listening socket is opened with SO_REUSEPORT so a new process can bind the same port while
# this one drains (the router sets both).
SHUTDOWN_TIMEOUT = web.AppKey("shutdown_timeout", float)
REUSE_PORT = web.AppKey("reuse_port", bool)
# A draining role (REUSE_PORT) stops listening, then answers every request with `Connection: close`
# for up to this long (seconds), or until its clients have all closed their connections, before it
# closes the idle ones: a keep-alive client that sends its next request then gets an answer and
# moves to the new listener, instead of losing a request sent just as its idle connection closes.
KEEPALIVE_DRAIN = web.AppKey("keepalive_drain", float)

# A role whose app holds a RequestHandler here is served by it instead of the app's route table
# (the router does this for its proxy path); the app still owns startup and cleanup.
REQUEST_HANDLER = web.AppKey("request_handler", RoleHandler)


class StartupError(Exception):
    """A role could not start (port taken, bad address, failed startup hook)."""


class _EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse with the JSON envelope."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:  # the client's mistake: not worth a traceback per request
            log.debug("malformed request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            resp = error_response(status, "internal error", "server_error")
        else:
            text = (message or (str(exc) if exc else "") or "malformed request").splitlines()[0][:300]
            resp = error_response(status, f"malformed HTTP request: {text}", code="malformed_request")
        resp.force_close()
        return resp


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """aiohttp's AppRunner with three differences: connections answer unparsable requests with the
    JSON envelope (aiohttp's own are text/plain); an app that declares a REQUEST_HANDLER is served
    by it instead of its route table; and a draining app (REUSE_PORT) stops listening before its
    idle connections are closed. The app's startup and cleanup run as usual."""

    draining = False

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        handler = self.app.get(REQUEST_HANDLER)
        factory = handler.make_request if handler is not None else plain.request_factory

        def make_request(message: Any, *args: Any) -> web.BaseRequest:
            if self.draining:
                message = message._replace(should_close=True)   # answered with Connection: close
            return factory(message, *args)

        return _EnvelopeServer(handler.dispatch if handler is not None else plain.request_handler,
                               request_factory=make_request,
                               handler_cancellation=plain.handler_cancellation,
                               loop=plain._loop, **plain._kwargs)  # noqa: SLF001 - rebuilt as-is, one class swapped

    async def cleanup(self) -> None:
        if self.app.get(REUSE_PORT):
            # Stop listening first; then, while keep-alive clients send their next request, answer
            # each with Connection: close (they reconnect to the new listener), until they have all
            # gone or _KEEPALIVE_DRAIN passes; then aiohttp closes the connections with no request
            # in progress and waits for the others.
            for site in list(self.sites):
                await site.stop()
            self.draining = True
            loop = asyncio.get_running_loop()
            until = loop.time() + self.app.get(KEEPALIVE_DRAIN, 2.0)
            server = self.server
            while server is not None and server.connections and loop.time() < until:
                await asyncio.sleep(0.05)
        await super().cleanup()


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft open-files limit to the hard one, so many clients do not run us out of fds."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft, hard
    log.debug("open-files limit raised from %d to %d", soft, target)
    return target, hard


class AcceptErrorLog:
    """A loop exception handler that reports resource exhaustion once per interval, with a count,
    instead of one traceback per failed accept(); everything else goes to the default handler."""

    RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

    def __init__(self, interval: float = ACCEPT_ERROR_INTERVAL) -> None:
        self.interval = interval
        self.count = 0           # failures since the last report
        self.total = 0
        self.last_report = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in self.RESOURCE_ERRNOS):
            loop.default_exception_handler(context)
            return
        self.count += 1
        self.total += 1
        now = time.monotonic()
        if now - self.last_report >= self.interval:
            log.error("cannot accept connections: %s (%d time(s) in the last %.0f s); open connections are "
                      "at the process's limit", exc.strerror or exc, self.count, self.interval)
            self.count = 0
            self.last_report = now

    async def watch(self, every: float = 1.0) -> None:
        """Notice the fd limit being reached on loops that do not report failed accepts (uvloop
        keeps such connections queued silently): a spare descriptor that cannot be had means the
        process is at its limit. Reported like a failed accept, once per interval."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            try:
                os.close(os.dup(2))
            except OSError as exc:
                if exc.errno in self.RESOURCE_ERRNOS:
                    self(loop, {"message": "open files at the limit", "exception": exc})


async def start_app(hosted: HostedApp, idle_timeout: float = IDLE_TIMEOUT) -> AppRunner:
    """Run the app's startup (cleanup_ctx) and open its listening socket."""
    # handler_cancellation: a client that goes away cancels its handler at once, so the router
    # closes the backend connection (and generation stops) without waiting for its next write.
    runner = AppRunner(hosted.app, handle_signals=False, access_log=None,
                       shutdown_timeout=hosted.app.get(SHUTDOWN_TIMEOUT, 5.0), handler_cancellation=True,
                       keepalive_timeout=idle_timeout)
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

    raise_fd_limit()
    accept_errors = AcceptErrorLog()
    loop.set_exception_handler(accept_errors)
    fd_watch = asyncio.create_task(accept_errors.watch(), name="fd-limit-watch")
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
        # What is alive now (the program's modules, config and apps) lives as long as the process:
        # freeze it, so no full garbage collection walks it again (37,000 objects in a router,
        # about 20 ms of every full collection on a small machine). No collection first: with a
        # large table already taken in, that alone held the loop for 20-30 ms.
        freeze_heap()
        if on_listening is not None:
            on_listening()
        await stop.wait()
    except StartupError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        fd_watch.cancel()
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
