"""Keeps the registry told: both records registered, heartbeats with the real state, re-registration."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from ..client.registry import RegistryClient, RegistryRejected, RegistryUnavailable
from ..config.babysitter import BabysitterConfig
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class Registration:
    """Registers `N` and `N-server`, heartbeats both, and re-registers whenever the registry forgot them."""

    def __init__(self, config: BabysitterConfig, supervisor: Supervisor, session: aiohttp.ClientSession | None) -> None:
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

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"registration {self.config.service_name}")

    async def _register(self) -> None:
        await self.client.register(self._record(self.config.service_name, self.config.api_port,
                                                self.babysitter_metadata()))
        await self.client.register(self._record(self.config.server_name, self.config.port,
                                                self.backend_metadata()))

    async def _heartbeat(self) -> bool:
        """Heartbeat both records; False if the registry no longer knows one of them."""
        state = self.supervisor.state
        ok = await self.client.heartbeat(self.config.service_name, state, self.babysitter_metadata())
        ok = await self.client.heartbeat(self.config.server_name, state, self.backend_metadata()) and ok
        self.heartbeats += 1
        return ok

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
                elif not await self._heartbeat():
                    log.warning("%s: the registry forgot us (heartbeat answered 404); registering again",
                                self.config.service_name)
                    self.registered = False
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

    async def close(self) -> None:
        """Stop heartbeating and remove both records (best effort, briefly)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for name in (self.config.server_name, self.config.service_name):
            try:
                await asyncio.wait_for(self.client.deregister(name), 3.0)
            except (RegistryUnavailable, RegistryRejected, asyncio.TimeoutError) as exc:
                log.warning("%s: could not deregister %s: %s", self.config.service_name, name, exc)
