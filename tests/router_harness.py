"""Helpers for the router tests: a real registry, real mock backends, and a router watching them."""
from __future__ import annotations

import re
import sys
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from harness import ROOT, async_wait_for, free_port
from infinilm_svc.client.registry import RegistryClient
from infinilm_svc.config.registry import RegistryConfig
from infinilm_svc.config.router import RouterConfig
from infinilm_svc.mock.app import create_app as create_mock
from infinilm_svc.mock.options import MockOptions
from infinilm_svc.registry.app import create_app as create_registry
from infinilm_svc.router.app import create_app as create_router
from infinilm_svc.runtime import HostedApp, start_app

HOST = "127.0.0.1"
SERVED_BY = re.compile(r"Hello from (\S+)")


def served_by(answer: dict) -> str:
    """The mock that produced a chat or completion answer."""
    choice = answer["choices"][0]
    text = choice.get("message", {}).get("content") or choice.get("text") or ""
    m = SERVED_BY.search(text)
    assert m, f"answer does not name its backend: {answer!r}"
    return m.group(1)


def backend_record(name: str, port: int, models: list[str], status: str = "running", **meta: Any) -> dict:
    return {"name": name, "host": HOST, "port": port, "url": f"http://{HOST}:{port}", "status": status,
            "metadata": {"type": "openai-api", "role": "backend", "models": models, **meta}}


def router_config(registry_url: str | None, **kw: Any) -> RouterConfig:
    base = RouterConfig(bind=HOST, port=free_port(), registry_url=registry_url, health_interval=0.2,
                        health_timeout=1.0, heartbeat_interval=0.2, watch_wait=5.0, eject_cooldown=2.0,
                        retry_backoff=0.01, access_log=False, keepalive_drain=0.5,
                        static_services=kw.pop("static_services", None))
    return replace(base, **kw)


def mock_command(name: str, port: int, models: list[str], *knobs: str) -> list[str]:
    """argv that runs the real mock as its own process."""
    return [sys.executable, "-m", "infinilm_svc", "mock", "--name", name, "--port", str(port), "--host", HOST,
            "--models", ",".join(models), *knobs]


class Deployment:
    """A registry, N mocks and a router, all real servers on loopback."""

    def __init__(self, aiohttp_server) -> None:
        self.aiohttp_server = aiohttp_server
        # A bounded client timeout turns a hang into a clear failure (well under pytest's own timeout).
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.registry_url = ""
        self.registry: RegistryClient | None = None
        self.registry_server = None
        self.runners: list = []
        self.router_url = ""
        self.router_app = None

    async def start_registry(self) -> str:
        port = free_port()
        cfg = RegistryConfig(bind=HOST, port=port, sweep_interval=0.1, probe_interval=0)
        self.registry_server = await self.aiohttp_server(create_registry(cfg), host=HOST, port=port)
        self.registry_url = f"http://{HOST}:{port}"
        self.registry = RegistryClient(self.session, self.registry_url)
        return self.registry_url

    async def start_mock(self, name: str, models: list[str], register: bool = True, **knobs: Any) -> int:
        port = free_port()
        await self.aiohttp_server(create_mock(MockOptions(name=name, port=port, models=tuple(models), host=HOST,
                                                          **knobs)), host=HOST, port=port)
        if register:
            await self.register(name, port, models)
        return port

    async def register(self, name: str, port: int, models: list[str], status: str = "running", **meta: Any) -> None:
        assert self.registry is not None
        await self.registry.register(backend_record(name, port, models, status, **meta))

    async def start_router(self, **kw: Any) -> str:
        """Start the router, hosted exactly as runtime.serve hosts it."""
        cfg = router_config(self.registry_url or None, **kw)
        self.router_app = create_router(cfg)
        self.runners.append(await start_app(HostedApp("router", "router", self.router_app, HOST, cfg.port)))
        self.router_url = f"http://{HOST}:{cfg.port}"
        return self.router_url

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.get(self.router_url + path, **kw) as r:
            return r.status, await r.json(content_type=None), r.headers

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.post(self.router_url + path, json=body, **kw) as r:
            raw = await r.read()
            try:
                import json
                data = json.loads(raw)
            except ValueError:
                data = raw.decode(errors="replace")
            return r.status, data, r.headers

    async def chat(self, model: str, content: str = "hi", **extra: Any) -> str:
        status, data, _ = await self.post("/v1/chat/completions",
                                          {"model": model, "messages": [{"role": "user", "content": content}],
                                           **extra})
        assert status == 200, data
        return served_by(data)

    async def wait_routable(self, n: int, total: int | None = None) -> None:
        async def ok():
            _, h, _ = await self.get("/health")
            got, all_ = h["healthy_services"].split("/")
            return h if int(got) == n and (total is None or int(all_) == total) else None
        await async_wait_for(ok, timeout=10, what=f"{n} routable backends")

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        await self.session.close()


@pytest.fixture
async def dep(aiohttp_server):
    """A running registry; tests add mocks and a router."""
    d = Deployment(aiohttp_server)
    await d.start_registry()
    yield d
    await d.close()


__all__ = ["ROOT", "Deployment", "dep", "HOST", "backend_record", "mock_command", "router_config", "served_by"]
