"""The registry client's fail-over along several URLs: transport errors and 5xx move on, 4xx do not."""
from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web

from harness import free_port
from infinilm_svc.client.registry import RegistryClient, RegistryRejected, RegistryUnavailable, registry_urls


def test_registry_urls_accepts_a_string_a_comma_list_or_a_list():
    assert registry_urls("http://a:1/") == ["http://a:1"]
    assert registry_urls(" http://a:1 , http://b:2,") == ["http://a:1", "http://b:2"]
    assert registry_urls(("http://a:1", "http://b:2,http://c:3")) == ["http://a:1", "http://b:2", "http://c:3"]
    assert registry_urls(None) == []


async def _server(aiohttp_server, status: int):
    seen = []

    async def services(request):
        seen.append(request.path)
        if status >= 400:
            return web.json_response({"error": {"message": f"answer {status}"}}, status=status)
        return web.json_response({"services": [{"name": "x"}]}, headers={"X-Registry-Index": "7"})

    app = web.Application()
    app.router.add_get("/services", services)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}", seen


async def test_a_dead_registry_is_skipped_and_the_client_stays_on_the_live_one(aiohttp_server, caplog):
    live, seen = await _server(aiohttp_server, 200)
    dead = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, [dead, live])
        with caplog.at_level(logging.WARNING):
            records, index = await client.services()
        assert records == [{"name": "x"}] and index == 7
        assert client.url == live and client.failovers == 1
        assert client.last_failover["from"] == dead and client.last_failover["to"] == live
        assert f"registry {dead} failed" in caplog.text and f"moving to {live}" in caplog.text
        await client.services()
        assert client.failovers == 1 and len(seen) == 2


@pytest.mark.parametrize("status, moves", [(503, True), (500, True), (401, False), (400, False)])
async def test_5xx_moves_on_and_4xx_is_the_answer(aiohttp_server, status, moves):
    first, first_seen = await _server(aiohttp_server, status)
    second, second_seen = await _server(aiohttp_server, 200)
    async with aiohttp.ClientSession() as s:
        client = RegistryClient(s, f"{first},{second}")
        if moves:
            assert (await client.services())[0] == [{"name": "x"}]
            assert client.url == second and len(second_seen) == 1
        else:
            with pytest.raises(RegistryRejected):
                await client.services()
            assert client.url == first and second_seen == []


async def test_every_registry_down_is_one_error_naming_each(aiohttp_server):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with aiohttp.ClientSession() as s:
        with pytest.raises(RegistryUnavailable) as err:
            await RegistryClient(s, dead).services()
    assert "no registry answered" in str(err.value) and dead[0] in str(err.value) and dead[1] in str(err.value)
