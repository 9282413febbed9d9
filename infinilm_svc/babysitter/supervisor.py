"""Supervision of one backend: start, readiness, liveness, restarts with back-off, FATAL."""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Callable

import aiohttp

from ..background import TaskSupervisor
from ..config.babysitter import BabysitterConfig
from .logbook import LogBook
from .pidfile import end_leftover, port_holder, port_in_use, remove_pid_file, write_pid_file
from .process import BackendProcess, launch_spec, probe_host, signal_number

log = logging.getLogger(__name__)

# Backend states (supervisord's vocabulary, plus UNRESPONSIVE: alive but its last liveness probe
# went unanswered); only RUNNING is routable.
STARTING, RUNNING, BACKOFF, FATAL, STOPPING, STOPPED = "starting", "running", "backoff", "fatal", "stopping", "stopped"
UNRESPONSIVE = "unresponsive"
STATES = (STARTING, RUNNING, UNRESPONSIVE, BACKOFF, FATAL, STOPPING, STOPPED)


def describe_exit(code: int | None) -> str:
    """`exited with code 1` / `was killed by SIGKILL` style text for an exit status."""
    if code is None:
        return "could not be started"
    if code < 0:
        try:
            return f"exited with code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with code {code}"
    return f"exited with code {code}"


_ERROR_WORDS = ("error", "failed", "fatal", "exception", "cannot", "unable", "no such file")


def error_line(lines: list[str]) -> str | None:
    """The backend's own account of why it stopped: its first line naming an error (the cause; later
    ones tend to be consequences), else its last line."""
    for line in lines:
        low = line.lower()
        if any(w in low for w in _ERROR_WORDS):
            return line.strip()[:500]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:500]
    return None


def parse_models(body: Any) -> list[dict]:
    """Model objects from `{"data": [...]}` or a bare list; ids as strings are accepted too."""
    items = body.get("data") if isinstance(body, dict) else body
    if not isinstance(items, list):
        return []
    out = []
    for m in items:
        if isinstance(m, dict) and isinstance(m.get("id"), str):
            out.append(m)
        elif isinstance(m, str):
            out.append({"id": m, "object": "model"})
    return out


class Supervisor:
    """Keeps one backend running and says, at every moment, what state it is really in."""

    def __init__(self, config: BabysitterConfig, logbook: LogBook, session: aiohttp.ClientSession,
                 pid_file: str | None = None) -> None:
        self.config = config
        self.pid_file = pid_file          # the running backend's pid, for the next babysitter if we are killed
        self.policy = config.babysitter
        self.logbook = logbook
        self.session = session
        self.state = STOPPED
        self.process: BackendProcess | None = None
        self.restarts = 0                 # every restart after the first start
        self.failures = 0                 # quick failures in a row (reset by a stable run)
        self.last_exit_code: int | None = None
        self.last_exit_reason: str | None = None
        self.last_error_line: str | None = None   # the backend's own first error line when it last failed
        self.running_since: float | None = None   # unix time the backend became ready
        self.state_since = time.time()
        self.models_list: list[dict] = self._declared_models()
        self.total_slots: int | None = None   # requests the engine runs at once, as its /props says
        self.listeners: list[Callable[[str], None]] = []
        self._desired = True
        self._restart_now = False          # a restart was requested: no back-off, no failure counted
        self._started = 0.0                # monotonic time of the current start
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._base = f"http://{probe_host(config)}:{config.port}"
        self._probe_timeout = aiohttp.ClientTimeout(total=self.policy.health_timeout)
        self._live_path: str | None = None  # the model-list path that answered at readiness

    # --- public --------------------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        return [m["id"] for m in self.models_list]

    @property
    def pid(self) -> int | None:
        p = self.process
        return p.pid if p is not None and p.returncode is None else None

    @property
    def uptime(self) -> float:
        """Seconds since the backend became ready; 0 unless it is running."""
        if self.state == RUNNING and self.running_since:
            return round(time.time() - self.running_since, 3)
        return 0

    @property
    def backend_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def start(self, tasks: TaskSupervisor | None = None) -> None:
        """Begin supervising (in the running loop); under `tasks`, a loop that fails is restarted."""
        if tasks is not None:
            self._task = tasks.spawn("supervise", self._loop).task
        else:
            self._task = asyncio.create_task(self._loop(), name=f"supervise {self.config.service_name}")

    def request_start(self) -> None:
        """POST /start: run the backend again (also leaves FATAL), with a fresh failure count."""
        self._desired = True
        self.failures = 0
        self._wake.set()

    def request_stop(self) -> None:
        """POST /stop: stop the backend and keep it stopped."""
        self._desired = False
        self._wake.set()

    def request_restart(self) -> None:
        """POST /restart: stop the backend if it runs and start it again at once."""
        self._desired = True
        self.failures = 0
        self._restart_now = True
        self._wake.set()

    def kill_now(self) -> None:
        """Last resort when the process is forced to exit: KILL the backend's group, no waiting."""
        if self.process is not None:
            self.process.kill_group()

    async def close(self) -> None:
        """Stop supervising and stop the backend (TERM to its group, stop_timeout, KILL)."""
        self._closing = True
        self._desired = False
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001
                log.exception("supervisor of %s failed", self.config.service_name)
        if self.process is not None and self.process.returncode is None:
            await self._stop_process("babysitter shutting down")
        if self.process is not None and self.process.returncode is not None:
            self._forget(self.process)
        self._set_state(STOPPED)

    # --- the loop ------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        self.state_since = time.time()
        for fn in self.listeners:
            try:
                fn(state)
            except Exception:  # noqa: BLE001
                log.exception("state listener failed")

    def _declared_models(self) -> list[dict]:
        created = int(time.time())
        return [{"id": m, "object": "model", "created": created, "owned_by": self.config.service_name}
                for m in self.config.backend.models]

    async def _loop(self) -> None:
        first = True
        while not self._closing:
            if not self._desired:
                if self.state != FATAL:
                    self._set_state(STOPPED)
                self._wake.clear()
                await self._wake.wait()
                continue
            if not first:
                self.restarts += 1
            first = False
            self._restart_now = False
            code, reason = await self._run_once()
            if self._closing:
                break
            self.last_exit_code, self.last_exit_reason = code, reason
            if not self._desired or self._restart_now:
                continue  # stopped or restarted on request: no back-off, no failure counted
            if code is not None and code > 0 and self.process is not None:   # it failed by itself
                self.last_error_line = error_line(self._output_since(self.process.started_at))
                if self.last_error_line:
                    reason = f"{reason}: {self.last_error_line}"
            if time.monotonic() - self._started >= self.policy.startsecs:
                self.failures = 0  # it had a stable run: this failure is a first one again
            self.failures += 1
            if self.failures > self.policy.max_restarts:
                self._desired = False
                self.logbook.marker(f"backend {reason}; giving up after {self.failures} quick failures "
                                    f"(max_restarts = {self.policy.max_restarts}): FATAL until POST /start")
                self._set_state(FATAL)
                continue
            cap = max(self.policy.backoff_max, self.policy.restart_delay)  # never below the first delay
            delay = min(self.policy.restart_delay * (2 ** min(self.failures - 1, 30)), cap)
            self.logbook.marker(f"backend {reason}; restarting in {delay:g} s")
            self._set_state(BACKOFF)
            await self._wait_wake(delay)

    def _output_since(self, since: float) -> list[str]:
        """The backend's own output lines (not our markers) logged since `since`."""
        return [e.line for e in self.logbook.tail(len(self.logbook.ring))
                if e.ts >= since and e.stream != "babysitter"]

    async def _wait_wake(self, timeout: float) -> None:
        """Sleep up to `timeout`, or less if a request (start/stop/restart/close) comes."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run_once(self) -> tuple[int | None, str]:
        """Start the backend and supervise it until it is gone; returns its exit code and why."""
        self._set_state(STARTING)
        self.running_since = None
        spec = launch_spec(self.config)
        self._started = time.monotonic()
        if (held := await self._port_held()) is not None:
            return None, held
        try:
            self.process = await BackendProcess.spawn(spec, self.logbook)
        except OSError as exc:
            self.process = None
            return None, f"could not be started ({spec.argv[0]}: {exc.strerror or exc})"
        proc = self.process
        self.logbook.marker(f"backend started (pid {proc.pid}): {' '.join(spec.argv)}")
        if self.pid_file:
            try:
                write_pid_file(self.pid_file, proc.pid, spec.argv)
            except OSError as exc:
                log.warning("%s: cannot write %s: %s", self.config.service_name, self.pid_file, exc)
        outcome = await self._until_ready(proc)
        if outcome != "ready":
            return await self._finish(proc, None if outcome == "exited" else outcome)
        self.running_since = time.time()
        self.logbook.marker(f"backend ready in {time.monotonic() - self._started:.1f} s; "
                            f"models: {', '.join(self.models) or '-'}")
        self._set_state(RUNNING)
        why = await self._while_alive(proc)
        return await self._finish(proc, why)

    async def _port_held(self) -> str | None:
        """Before a start: end what a killed babysitter left behind; say who else holds the port."""
        if self.pid_file and (ended := await end_leftover(self.pid_file)):
            self.logbook.marker(ended)
            log.warning("%s: %s", self.config.service_name, ended)
        host = probe_host(self.config)
        if not await asyncio.to_thread(port_in_use, host, self.config.port):
            return None
        holder = await asyncio.to_thread(port_holder, self.config.port)
        why = f"could not be started: port {self.config.port} is held by {holder}, not by a backend of this babysitter"
        log.error("%s: %s", self.config.service_name, why)
        return why

    async def _finish(self, proc: BackendProcess, why: str | None) -> tuple[int | None, str]:
        """Make sure the process is gone; `why` is None when it exited by itself."""
        if why is None:
            code = await proc.exited
            await proc.drain(0.5)
            self._forget(proc)
            return code, describe_exit(code)
        if proc.returncode is None:
            await self._stop_process(why)
        code = await proc.exited
        self._forget(proc)
        return code, f"{why} ({describe_exit(code)})"

    def _forget(self, proc: BackendProcess) -> None:
        """The backend and its group are gone (the exit watcher KILLed the group): drop the pid file."""
        if self.pid_file:
            remove_pid_file(self.pid_file)

    async def _stop_process(self, why: str) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        self.logbook.marker(f"stopping backend (pid {proc.pid}): {why}")
        self._set_state(STOPPING)
        await proc.stop(signal_number(self.policy.stopsignal), self.policy.stop_timeout)

    def _interrupted(self) -> str | None:
        if self._closing:
            return "babysitter shutting down"
        if not self._desired:
            return "stop requested"
        if self._restart_now:
            return "restart requested"
        return None

    async def _wait_exit_or_wake(self, proc: BackendProcess, timeout: float) -> None:
        """Return when the process exits, a request arrives, or `timeout` passes."""
        if self._interrupted() is not None or proc.returncode is not None:
            return
        self._wake.clear()
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((proc.exited, waker), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()

    async def _until_ready(self, proc: BackendProcess) -> str | None:
        """"ready", "exited", or why it has to be stopped before it became ready."""
        deadline = time.monotonic() + self.policy.ready_timeout
        pause = 0.05
        while True:
            if proc.returncode is not None:
                return "exited"
            if (why := self._interrupted()) is not None:
                return why
            if await self._probe(ready=True):
                if proc.returncode is not None:
                    return "exited"
                await self._read_slots()
                return "ready"
            if time.monotonic() >= deadline:
                return f"not ready within ready_timeout = {self.policy.ready_timeout:g} s"
            await self._wait_exit_or_wake(proc, min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0, self.policy.health_interval)

    async def _while_alive(self, proc: BackendProcess) -> str | None:
        """Liveness: None when the process exits by itself; else why it has to be stopped.

        The first unanswered probe makes the backend UNRESPONSIVE (not routable, the registry is
        told at once); an answer makes it RUNNING again; `liveness_failures` in a row restart it.
        """
        failed = 0
        while True:
            await self._wait_exit_or_wake(proc, self.policy.health_interval)
            if proc.returncode is not None:
                return None
            if (why := self._interrupted()) is not None:
                return why
            if self.failures and time.monotonic() - self._started >= self.policy.startsecs:
                self.failures = 0  # a stable run: the next failure is a first one again
            if await self._probe(ready=False):
                if self.state == UNRESPONSIVE:
                    self.logbook.marker(f"backend answers again after {failed} failed liveness probe(s)")
                    self._set_state(RUNNING)
                failed = 0
                continue
            if proc.returncode is not None:
                return None
            failed += 1
            self.logbook.marker(f"liveness probe failed ({failed}/{self.policy.liveness_failures})")
            if failed < self.policy.liveness_failures and self.state == RUNNING:
                self._set_state(UNRESPONSIVE)
            if failed >= self.policy.liveness_failures:
                return f"not answering: {failed} liveness probes failed"

    async def _read_slots(self) -> None:
        """The engine's slot count from its /props (llama-server's `total_slots`), read once it is
        ready: routers use it to place requests in slots. An engine without /props has none."""
        body = await self.get_json("/props")
        n = body.get("total_slots") if isinstance(body, dict) else None
        self.total_slots = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    async def _probe(self, ready: bool) -> bool:
        """One readiness/liveness probe; on readiness the model list is (re-)read.

        Liveness asks only the path that answered at readiness: a hung backend then costs one
        `health_timeout` per probe, not one per path tried.
        """
        b = self.config.backend
        if b.type == "llama.cpp":
            # The engine's own health: 503 while it loads the model ("starting"), 200 once it serves.
            if await self._get_status("/health") != 200:
                return False
            if ready:
                body = await self.get_json("/v1/models")
                self.models_list = parse_models(body) or self._declared_models()
            return True
        if b.health_path and b.models:
            ok = await self._get_status(b.health_path) == 200
            if ok and ready:
                self.models_list = self._declared_models()
            return ok
        paths: tuple[str, ...] = ("/v1/models", "/models")
        if not ready and self._live_path is not None:
            paths = (self._live_path,)
        for path in paths:
            body = await self.get_json(path)
            if body is None:
                continue
            models = parse_models(body)
            if models:
                if ready or [m["id"] for m in models] != self.models:
                    self.models_list = models
                if ready:
                    self._live_path = path
                return True
        return False

    async def _get_status(self, path: str) -> int | None:
        try:
            async with self.session.get(self._base + path, timeout=self._probe_timeout) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def get_json(self, path: str) -> Any:
        """The backend's JSON answer to GET `path`, or None (not 200, not JSON, not answering)."""
        try:
            async with self.session.get(self._base + path, timeout=self._probe_timeout) as resp:
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return None

    def status(self) -> dict:
        """The `/status` body."""
        return {
            "name": self.config.service_name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "failures": self.failures,
            "uptime": self.uptime,
            "started_at": self.process.started_at if self.process is not None else None,
            "last_exit_code": self.last_exit_code,
            "last_exit_reason": self.last_exit_reason,
            "last_error_line": self.last_error_line,
            "backend_url": self.backend_url,
            "models": self.models,
            "state_since": round(self.state_since, 3),
        }
