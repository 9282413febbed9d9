"""Keeps the registry told: both records registered, heartbeats with the real state, re-registration."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from ..background import TaskSupervisor
from ..client.registry import RegistryClient, RegistryRejected, RegistryUnavailable
from ..config.babysitter import BabysitterConfig
from .process import llama_host_cache
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class Registration:
    """Registers `N` and `N-server`, heartbeats both, and re-registers whenever the registry forgot them.

    It also parks one `GET /epoch?wait=` on the registry: when the registry goes away the answer
    (or the dropped connection) says so at once, and a registry that answers with another epoch
    (a new table) gets both records again right away, not at the next heartbeat.
    """

    EPOCH_WAIT = 120.0

    def __init__(self, config: BabysitterConfig, supervisor: Supervisor, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.supervisor = supervisor
        interval = config.babysitter.heartbeat_interval
        self.client = RegistryClient(session, config.registry_url or "", token=config.token,
                                     timeout=max(1.0, min(10.0, interval * 2)))
        self.interval = interval
        self.registered = False
        self.last_ok: float | None = None
        self.last_error: str | None = None
        self.heartbeats = 0
        self._poke = asyncio.Event()
        self._task: asyncio.Task | None = None
        # What the registry stored for each of our names when we registered (it may have put the
        # address it saw in place of a wildcard host): a heartbeat answer that differs is a hijack
        # or a stale record, and we register again.
        self.expected: dict[str, tuple] = {}
        self.overwritten = 0            # times the registry held someone else's record under our name
        self.ttl_warning: str | None = None
        self._watch: asyncio.Task | None = None
        self.epoch: str | None = None     # the registry's epoch when both records were registered

    # --- records -------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.config.host

    def babysitter_url(self) -> str:
        return f"http://{self.host}:{self.config.api_port}"

    def babysitter_metadata(self) -> dict:
        s = self.supervisor
        return {"type": self.config.backend.type, "role": "babysitter", "babysitter": "enhanced",
                "backend": self.config.server_name, "state": s.state, "url": self.babysitter_url()}

    def backend_metadata(self) -> dict:
        s = self.supervisor
        proc = s.process
        meta = {
            "type": "openai-api", "role": "backend", "parent_service": self.config.service_name,
            "babysitter": "enhanced", "babysitter_url": self.babysitter_url(),
            "models": s.models, "models_list": s.models_list, "state": s.state,
            "restarts": s.restarts, "pid": s.pid,
            "started_at": round(proc.started_at, 3) if proc is not None else None,
        }
        if s.total_slots:
            meta["total_slots"] = s.total_slots     # routers place requests in the engine's slots
        if self.config.backend.type == "llama.cpp":
            meta["host_prompt_cache"] = llama_host_cache(self.config.backend)
        if self.config.backend.type == "mock":
            # Who answers "Hello from <name>": lets validate tell which backend served a request.
            meta["mock_name"] = self.config.backend.mock_name or self.config.service_name
        meta.update(dict(self.config.metadata))  # the config's [metadata] wins (upstream)
        return meta

    def _record(self, name: str, port: int, metadata: dict) -> dict:
        return {"name": name, "host": self.host, "hostname": self.host, "port": port,
                "url": f"http://{self.host}:{port}", "status": self.supervisor.state, "metadata": metadata}

    # --- loop ----------------------------------------------------------------------------------

    def poke(self, _state: str | None = None) -> None:
        """Send a heartbeat now (the backend's state changed)."""
        self._poke.set()

    def start(self, tasks: TaskSupervisor | None = None) -> None:
        if tasks is not None:
            self._task = tasks.spawn("registration", self._loop).task
            self._watch = tasks.spawn("registry-epoch", self._watch_epoch).task
        else:
            self._task = asyncio.create_task(self._loop(), name=f"registration {self.config.service_name}")
            self._watch = asyncio.create_task(self._watch_epoch(), name=f"registry epoch {self.config.service_name}")

    async def _register(self) -> None:
        for name, port, meta in ((self.config.service_name, self.config.api_port, self.babysitter_metadata()),
                                 (self.config.server_name, self.config.port, self.backend_metadata())):
            record = self._record(name, port, meta)
            stored = await self.client.register(record)
            self.expected[name] = _identity(stored if stored else record)
        self.epoch = self.client.epoch
        self._check_ttl()

    def _check_ttl(self) -> None:
        """Warn (once per TTL seen) when heartbeats are too far apart for the registry's TTL."""
        ttl = self.client.heartbeat_ttl
        if ttl is None or self.interval <= ttl / 3:
            self.ttl_warning = None
            return
        warning = (f"heartbeat_interval {self.interval:g} s is more than a third of the registry's heartbeat_ttl "
                   f"{ttl:g} s: one late or lost heartbeat will mark the backend unhealthy; "
                   f"set heartbeat_interval <= {ttl / 3:g}")
        if warning != self.ttl_warning:
            log.warning("%s: %s", self.config.service_name, warning)
        self.ttl_warning = warning

    async def _heartbeat(self) -> str | None:
        """Heartbeat both records; None when all is well, else why we must register again."""
        state = self.supervisor.state
        for name, meta in ((self.config.service_name, self.babysitter_metadata()),
                           (self.config.server_name, self.backend_metadata())):
            held = await self.client.beat(name, state, meta)
            if held is None:
                return f"the registry forgot {name} (heartbeat answered 404)"
            expected = self.expected.get(name)
            if held and expected is not None and _identity(held) != expected:
                self.overwritten += 1
                return (f"the registry holds another record under {name} ({_describe(_identity(held))}, "
                        f"ours is {_describe(expected)}): someone re-registered our name")
        self.heartbeats += 1
        self._check_ttl()
        return None

    async def _loop(self) -> None:
        retry = min(0.25, self.interval)
        while True:
            self._poke.clear()
            try:
                if not self.registered:
                    await self._register()
                    self.registered = True
                    log.info("%s: registered %s and %s with %s", self.config.service_name, self.config.service_name,
                             self.config.server_name, self.client.url)
                elif (why := await self._heartbeat()) is not None:
                    log.warning("%s: %s; registering again", self.config.service_name, why)
                    self.registered = False
                    continue
                elif self._new_epoch(self.client.epoch):
                    continue
                self.last_ok = time.time()
                if self.last_error is not None:
                    log.info("%s: the registry answers again", self.config.service_name)
                self.last_error = None  # /status shows trouble only while it lasts
                retry = min(0.25, self.interval)
                wait = self.interval
            except (RegistryUnavailable, RegistryRejected) as exc:
                if str(exc) != self.last_error:  # say it once, and again only when the trouble changes
                    log.warning("%s: registry trouble (%s); retrying with back-off", self.config.service_name, exc)
                self.last_error = str(exc)
                self.registered = self.registered and isinstance(exc, RegistryUnavailable)
                wait = retry
                retry = min(retry * 2, self.interval)
            try:
                await asyncio.wait_for(self._poke.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _new_epoch(self, epoch: str | None) -> bool:
        """True (and registration is due) if the registry now answers with another table's epoch."""
        if not self.registered or epoch is None or self.epoch is None or epoch == self.epoch:
            return False
        log.warning("%s: the registry has a new table (epoch %s, was %s); registering again",
                    self.config.service_name, epoch, self.epoch)
        self.registered = False
        self._poke.set()
        return True

    async def _watch_epoch(self) -> None:
        """Park on the registry's /epoch; a registry that went away and came back is seen at once."""
        pause, wait = 0.1, 0.0   # the first look, and the first after trouble, does not park
        while True:
            try:
                body = await self.client.wait_epoch(wait)
            except (RegistryUnavailable, RegistryRejected):
                await asyncio.sleep(pause)
                pause, wait = min(pause * 2, 2.0), 0.0
                continue
            if body is None:
                return  # a registry without /epoch (upstream's): heartbeats alone tell
            self._new_epoch(body.get("epoch"))
            if body.get("closing"):
                await asyncio.sleep(pause)  # it is going away: look again soon, not in a tight loop
                wait = 0.0
            else:
                pause, wait = 0.1, self.EPOCH_WAIT

    async def close(self) -> None:
        """Stop heartbeating and remove both records (best effort, briefly)."""
        for task in (self._watch, self._task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for name in (self.config.server_name, self.config.service_name):
            try:
                await asyncio.wait_for(self.client.deregister(name), 3.0)
            except (RegistryUnavailable, RegistryRejected, asyncio.TimeoutError) as exc:
                log.warning("%s: could not deregister %s: %s", self.config.service_name, name, exc)


def _identity(record: dict) -> tuple:
    """What must not change under our name: where it points and what kind of service it is."""
    meta = record.get("metadata")
    return (record.get("host"), record.get("port"), (record.get("url") or "").rstrip("/") or None,
            meta.get("type") if isinstance(meta, dict) else None)


def _describe(identity: tuple) -> str:
    host, port, url, type_ = identity
    return f"{url or f'{host}:{port}'}, type {type_}"
