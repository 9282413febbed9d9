"""Where the app gets its data: the registry, the routers and the babysitters, over HTTP."""
from __future__ import annotations

from typing import AsyncIterator

import aiohttp

from infinilm_svc.client.babysitter import BabysitterClient, LogLine

from .poller import Poller
from .rows import Snapshot


class HttpSource:
    """Where the app gets its data: the registry and what it lists, over HTTP (tests pass a fake)."""

    def __init__(self, registry_url: str, token: str | None = None, stale_after: float = 120.0) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.token = token
        self.stale_after = stale_after
        self._session: aiohttp.ClientSession | None = None
        self._poller: Poller | None = None
        self._babysitters: BabysitterClient | None = None

    def _ensure(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._poller = Poller(self._session, self.registry_url, stale_after=self.stale_after)
            self._babysitters = BabysitterClient(self._session, self.token)

    async def poll(self) -> Snapshot:
        self._ensure()
        assert self._poller is not None
        return await self._poller.poll()

    def follow_logs(self, babysitter_url: str, tail: int = 200) -> AsyncIterator[LogLine]:
        self._ensure()
        assert self._babysitters is not None
        return self._babysitters.follow(babysitter_url, tail)

    async def act(self, babysitter_url: str, action: str) -> str:
        self._ensure()
        assert self._babysitters is not None
        return await self._babysitters.act(babysitter_url, action)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
