"""validate attributes each answer to a backend: from a mock's own words, else from the router's header."""
from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from harness import async_wait_for, free_port
from infinilm_svc.client.babysitter import BabysitterClient
from infinilm_svc.client.registry import RegistryClient
from infinilm_svc.config import RegistryConfig, RouterConfig
from infinilm_svc.registry.app import create_app as create_registry
from infinilm_svc.router.app import create_app as create_router
from infinilm_svc.runtime import HostedApp, start_app
from infinilm_svc.validate import ValidateOptions
from infinilm_svc.validate.deployment import Run, chat, refresh_records


def real_model_backend(*, name_in_answer: str | None = None) -> web.Application:
    """A backend that answers like a real model: its text does not name the server (unless told to)."""
    text = f"Hello from {name_in_answer} (model: model-x)" if name_in_answer else "Paris is the capital of France."

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "model-x", "object": "model"}]})

    async def health(request):
        return web.json_response({"status": "ok"})

    async def completions(request):
        body = await request.json()
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            return resp
        return web.json_response({"object": "chat.completion", "model": "model-x",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", completions)
    return app


@pytest.fixture
async def runners():
    """Runners started by a test (the router, hosted as the runtime hosts it), cleaned up after it."""
    started: list = []
    yield started
    for runner in started:
        await runner.cleanup()


async def deploy(aiohttp_server, runners: list, backend_app: web.Application) -> tuple[str, str]:
    registry = await aiohttp_server(create_registry(RegistryConfig(probe_interval=0)), host="127.0.0.1")
    registry_url = f"http://127.0.0.1:{registry.port}"
    backend = await aiohttp_server(backend_app, host="127.0.0.1")
    async with aiohttp.ClientSession() as s:
        await RegistryClient(s, registry_url).register({
            "name": "real-1-server", "host": "127.0.0.1", "port": backend.port, "status": "running",
            "metadata": {"type": "openai-api", "models": ["model-x"]}})
    port = free_port()
    runner = await start_app(HostedApp("router", "router", create_router(RouterConfig(
        registry_url=registry_url, access_log=False, heartbeat_interval=0.5)), "127.0.0.1", port))
    runners.append(runner)
    router_url = f"http://127.0.0.1:{port}"

    async def routed() -> bool:
        async with aiohttp.ClientSession() as s, s.get(router_url + "/v1/models") as r:
            return r.status == 200 and [m["id"] for m in (await r.json())["data"]] == ["model-x"]

    await async_wait_for(routed, timeout=10, what="the router to route model-x")
    return registry_url, router_url


async def run_chat(registry_url: str, router_url: str, stream: bool):
    async with aiohttp.ClientSession() as session:
        run = Run(options=ValidateOptions(registry=registry_url, router=router_url, timeout=5), session=session,
                  babysitters=BabysitterClient(session))
        run.router = router_url
        await refresh_records(run)
        return await chat(run, "model-x", stream, "attr")


async def test_a_real_models_answer_is_attributed_through_the_routers_header(aiohttp_server, runners):
    registry_url, router_url = await deploy(aiohttp_server, runners, real_model_backend())
    for stream in (False, True):
        ans = await run_chat(registry_url, router_url, stream)
        assert ans.error is None, ans
        assert ans.served_by == "real-1-server" and ans.routed_to == "real-1-server"


async def test_an_answer_contradicting_the_routers_header_is_an_error(aiohttp_server, runners):
    """The backend says it is babysitter-z; the router says real-1-server served it: validate says so."""
    registry_url, router_url = await deploy(aiohttp_server, runners, real_model_backend(name_in_answer="real-1"))
    async with aiohttp.ClientSession() as s:
        await RegistryClient(s, registry_url).register({
            "name": "other-server", "host": "127.0.0.1", "port": 9, "status": "stopped",
            "metadata": {"type": "openai-api", "models": ["model-x"], "parent_service": "real-1"}})
    ans = await run_chat(registry_url, router_url, False)
    assert ans.served_by == "other-server"
    assert ans.error is not None and "router says real-1-server served it" in ans.error
