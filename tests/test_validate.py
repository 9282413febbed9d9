"""validate against a small in-process deployment (real registry, router, babysitters and mocks): each check can fail."""
from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from harness import async_wait_for, free_port
from infinilm_svc import validate
from infinilm_svc.client.registry import RegistryClient
from infinilm_svc.config import BabysitterConfig, BackendConfig, RegistryConfig, RouterConfig, SupervisionConfig
from infinilm_svc.runtime import HostedApp, start_app
from infinilm_svc.validate import CheckResult, ExpectedService, ValidateOptions, run_checks


def _loopback_pair() -> tuple[str, str]:
    """Two distinct loopback addresses that are not the demo's, one per simulated server."""
    a, b = random.sample(range(20, 251), 2)
    return f"127.0.{random.randint(1, 250)}.{a}", f"127.0.{random.randint(1, 250)}.{b}"


@dataclass
class Deployment:
    """Roles running in the test's event loop; babysitters run real mock processes."""

    host1: str
    host2: str
    tmp: Path
    runners: list = field(default_factory=list)
    registry_url: str = ""
    router_url: str = ""

    async def start(self, hosted: HostedApp) -> None:
        self.runners.append(await start_app(hosted))

    async def start_registry(self, host: str) -> str:
        port = free_port(host)
        await self.start(HostedApp("registry", "registry", _create("registry", RegistryConfig(
            bind=host, port=port, heartbeat_ttl=3, expire_after=30, sweep_interval=0.2, probe_interval=0)), host, port))
        return f"http://{host}:{port}"

    async def start_router(self, host: str, registry_url: str) -> str:
        port = free_port(host)
        await self.start(HostedApp("router", "router", _create("router", RouterConfig(
            bind=host, port=port, registry_url=registry_url, heartbeat_interval=0.3, health_interval=0.5,
            access_log=False)), host, port))
        return f"http://{host}:{port}"

    async def start_babysitter(self, name: str, host: str, model: str) -> None:
        port = free_port(host, pair=True)
        cfg = BabysitterConfig(
            port=port, name=name, host=host, bind=host, registry_url=self.registry_url,
            backend=BackendConfig(type="mock", models=(model,)),
            babysitter=SupervisionConfig(heartbeat_interval=0.3, restart_delay=0.1, health_interval=0.5,
                                         stop_timeout=3, log_dir=str(self.tmp / "logs")))
        await self.start(HostedApp("babysitter", name, _create("babysitter", cfg), host, port + 1))

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


def _create(role: str, config):
    if role == "registry":
        from infinilm_svc.registry.app import create_app
    elif role == "router":
        from infinilm_svc.router.app import create_app
    else:
        from infinilm_svc.babysitter.app import create_app
    return create_app(config)


PLACEMENT = {"babysitter-a": ("model-1", 1), "babysitter-b": ("model-2", 1),
             "babysitter-c": ("model-1", 2), "babysitter-d": ("model-2", 2)}


async def _records(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        return (await RegistryClient(s, url).services())[0]


async def _healthy_names(url: str) -> set[str]:
    return {r["name"] for r in await _records(url) if r.get("is_healthy")}


async def deploy(tmp_path: Path, without: tuple[str, ...] = ()) -> Deployment:
    h1, h2 = _loopback_pair()
    d = Deployment(h1, h2, tmp_path)
    d.registry_url = await d.start_registry(h1)
    d.router_url = await d.start_router(h1, d.registry_url)
    for name, (model, server) in PLACEMENT.items():
        if name not in without:
            await d.start_babysitter(name, h1 if server == 1 else h2, model)
    await wait_ready(d, without)
    return d


async def wait_ready(d: Deployment, without: tuple[str, ...] = ()) -> None:
    """Every babysitter and backend record healthy, and the router routing to every backend."""
    want = {n for n in PLACEMENT if n not in without} | {f"{n}-server" for n in PLACEMENT if n not in without}

    async def ready() -> bool:
        names = await _healthy_names(d.registry_url)
        async with aiohttp.ClientSession() as s, s.get(d.router_url + "/health") as r:
            body = await r.json()
        return want <= names and body.get("healthy_services") == f"{len(want) // 2}/{len(want) // 2}"

    await async_wait_for(ready, timeout=20, interval=0.1, what=f"records {sorted(want)} healthy and routed")


# One deployment for the module: its tests share the module's event loop (`shared`), and each gets
# it back as it was (the `deployment` fixture).
shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_deployment(tmp_path_factory):
    d = await deploy(tmp_path_factory.mktemp("validate"))
    yield d
    await d.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def deployment(module_deployment):
    """The module's deployment, healthy and routed; what a test adds to it (registries, routers,
    stand-ins, records) is stopped and removed after the test."""
    d = module_deployment
    await wait_ready(d)
    started = len(d.runners)
    names = {r["name"] for r in await _records(d.registry_url)}
    yield d
    added, d.runners[started:] = d.runners[started:], []
    for runner in reversed(added):
        await runner.cleanup()
    async with aiohttp.ClientSession() as s:
        registry = RegistryClient(s, d.registry_url)
        for r in (await registry.services())[0]:
            if r["name"] not in names:
                await registry.deregister(r["name"])


async def collect(options: ValidateOptions) -> dict[int, CheckResult]:
    return {r.number: r async for r in run_checks(options)}


def _table(results: dict[int, CheckResult]) -> str:
    return "\n".join(validate.format_row(r, 200) for r in results.values())


async def _copy_records(src_url: str, dst_url: str, keep, edit=lambda r: r) -> None:
    """Register copies of src's records (those `keep` accepts, changed by `edit`) in another registry."""
    async with aiohttp.ClientSession() as s:
        dst = RegistryClient(s, dst_url)
        for r in await _records(src_url):
            if keep(r):
                r = edit(r)
                await dst.register({k: r[k] for k in ("name", "host", "port", "hostname", "url", "status", "metadata")})


@shared
async def test_every_check_passes_on_a_healthy_deployment_including_chaos(deployment):
    """Checks 1-9 and --chaos pass; the chaos check stops a backend, keeps traffic flowing and starts it again."""
    results = await collect(ValidateOptions(registry=deployment.registry_url, chaos=True, timeout=5, chaos_timeout=15))
    assert [n for n, r in results.items() if not r.passed] == [], _table(results)
    assert sorted(results) == list(range(1, 11))
    assert "on 2 hosts" in results[3].detail
    assert "babysitter-a-server 4, babysitter-c-server 4" in results[7].detail
    assert "started again" in results[10].detail
    assert validate.summary_line(list(results.values())) == "10 passed, 0 failed"
    # The chaos target (babysitter-d by default) is back and healthy.
    assert "babysitter-d-server" in await _healthy_names(deployment.registry_url)


async def test_a_missing_backend_fails_discovery_and_load_balancing(tmp_path):
    """Without babysitter-d, check 3 names both its records and check 7 names its backend; 4 still passes."""
    d = await deploy(tmp_path, without=("babysitter-d",))
    try:
        results = await collect(ValidateOptions(registry=d.registry_url, timeout=5))
    finally:
        await d.stop()
    assert not results[3].passed
    assert "not registered: babysitter-d, babysitter-d-server" in results[3].detail
    assert not results[7].passed
    assert "babysitter-d-server served 0 of 8" in results[7].detail
    assert "model-1" not in results[7].detail  # model-1 is balanced fine
    assert results[4].passed and results[5].passed and results[8].passed


@shared
async def test_one_backend_serving_all_traffic_fails_only_load_balancing(deployment):
    """A router that knows only babysitter-a for model-1 sends it everything: check 7 fails, naming babysitter-c."""
    d = deployment
    reg2 = await d.start_registry(d.host1)
    await _copy_records(d.registry_url, reg2, keep=lambda r: r["name"] in ("babysitter-a-server", "babysitter-b-server",
                                                                             "babysitter-d-server"))
    router2 = await d.start_router(d.host1, reg2)

    async def routed() -> bool:
        async with aiohttp.ClientSession() as s, s.get(router2 + "/health") as r:
            return (await r.json()).get("healthy_services") == "3/3"

    await async_wait_for(routed, timeout=10, what="the second router routing to a, b and d")
    results = await collect(ValidateOptions(registry=d.registry_url, router=router2, timeout=5))
    failed = [n for n, r in results.items() if not r.passed]
    assert failed == [7], _table(results)
    assert "model-1: babysitter-c-server served 0 of 8 (fair share: each >= 2)" in results[7].detail
    assert "model-2" not in results[7].detail


@shared
async def test_a_request_id_missing_from_its_backends_log_fails_logs(deployment):
    """If the registry points babysitter-c-server at babysitter-a's /logs, ids served by c are missing: check 8 fails."""
    d = deployment
    recs = {r["name"]: r for r in await _records(d.registry_url)}
    a_url = recs["babysitter-a-server"]["metadata"]["babysitter_url"]

    def swap(r: dict) -> dict:
        if r["name"] == "babysitter-c-server":
            return {**r, "metadata": {**r["metadata"], "babysitter_url": a_url}}
        return r

    reg2 = await d.start_registry(d.host1)
    await _copy_records(d.registry_url, reg2, keep=lambda r: r["name"] in recs and "router" not in r["name"], edit=swap)
    results = await collect(ValidateOptions(registry=reg2, router=d.router_url, timeout=5, log_wait=1))
    failed = [n for n, r in results.items() if not r.passed]
    assert failed == [8], _table(results)
    assert "served by babysitter-c-server is not in its log" in results[8].detail
    assert "served by babysitter-a-server also appears in the log of babysitter-c-server" in results[8].detail


async def start_front(d: Deployment, tamper) -> str:
    """A stand-in router in front of the real one: `tamper(request, body)` may answer instead of it (or None to relay)."""
    session = aiohttp.ClientSession()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        own = await tamper(request, body)
        if own is not None:
            return own
        async with session.request(request.method, d.router_url + request.path_qs, data=body,
                                   headers={k: v for k, v in request.headers.items()
                                            if k.lower() in ("content-type", "x-request-id")}) as up:
            out = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers.get("Content-Type", "")})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def close_session(app: web.Application):
        yield
        await session.close()

    app = web.Application()
    app.cleanup_ctx.append(close_session)
    app.router.add_route("*", "/{tail:.*}", relay)
    port = free_port(d.host1)
    await d.start(HostedApp("router", "front", app, d.host1, port))
    return f"http://{d.host1}:{port}"


def _is_chat(request: web.Request, body: bytes, stream: bool) -> bool:
    return request.path == "/v1/chat/completions" and bool(json.loads(body).get("stream")) == stream


@shared
async def test_a_router_without_healthy_backends_fails_only_router_health(deployment):
    """A router whose /health reports no healthy backend fails check 2, naming what it said; the rest pass."""
    async def no_backends(request, body):
        if request.path == "/health":
            return web.json_response({"status": "healthy", "healthy_services": "0/4"})
        return None

    front = await start_front(deployment, no_backends)
    results = await collect(ValidateOptions(registry=deployment.registry_url, router=front, timeout=5))
    assert [n for n, r in results.items() if not r.passed] == [2], _table(results)
    assert f"{front} has no healthy backend (healthy_services='0/4'" in results[2].detail


@shared
async def test_an_answer_from_a_backend_not_serving_the_model_fails_chat(deployment):
    """Non-streamed answers for model-1 that name babysitter-b (which serves model-2) fail check 5; 6 passes."""
    async def misnamed(request, body):
        if not _is_chat(request, body, stream=False):
            return None
        async with aiohttp.ClientSession() as s, s.post(deployment.router_url + request.path, data=body,
                                                         headers={"Content-Type": "application/json"}) as up:
            answer = await up.json()
            if up.status != 200:
                return web.json_response(answer, status=up.status)
        content = answer["choices"][0]["message"]["content"]
        answer["choices"][0]["message"]["content"] = content.replace("babysitter-a", "babysitter-b").replace(
            "babysitter-c", "babysitter-b")
        return web.json_response(answer)

    front = await start_front(deployment, misnamed)
    # Check 8 looks for each id in the log of the backend the answer names, which never has it: a
    # short log_wait, since only how long it waits for the log depends on it.
    results = await collect(ValidateOptions(registry=deployment.registry_url, router=front, timeout=5, log_wait=0.5))
    assert not results[5].passed, _table(results)
    assert "model-1: answered by babysitter-b-server, which does not serve it (expected one of " \
           "babysitter-a-server, babysitter-c-server)" in results[5].detail
    assert "model-2" not in results[5].detail
    assert all(results[n].passed for n in (1, 2, 3, 4, 6, 9)), _table(results)


@shared
async def test_a_failing_stream_fails_streaming_chat(deployment):
    """A router that answers 500 to streamed chat fails check 6 with the error it gave; check 5 passes."""
    async def no_streams(request, body):
        if _is_chat(request, body, stream=True):
            return web.json_response({"error": {"message": "streams are broken", "type": "server_error",
                                                "code": 500}}, status=500)
        return None

    front = await start_front(deployment, no_streams)
    results = await collect(ValidateOptions(registry=deployment.registry_url, router=front, timeout=5))
    assert not results[6].passed, _table(results)
    assert "model-1: HTTP 500: streams are broken (code 500)" in results[6].detail
    assert "model-2: HTTP 500: streams are broken (code 500)" in results[6].detail
    assert all(results[n].passed for n in (1, 2, 3, 4, 5, 9)), _table(results)


@shared
async def test_model_aggregation_fails_when_a_model_is_not_expected(deployment):
    """Check 4 compares exactly: an extra expected model is reported missing from /models and /v1/models."""
    opts = ValidateOptions(registry=deployment.registry_url, expect_models=("model-1", "model-2", "model-3"), timeout=5)
    results = await collect(opts)
    assert not results[4].passed
    assert "/models lists ['model-1', 'model-2']: missing model-3" in results[4].detail
    assert "/v1/models lists ['model-1', 'model-2']: missing model-3" in results[4].detail


@shared
async def test_all_servers_on_one_host_fails_discovery(deployment):
    """Check 3 asks for records from both server addresses; naming a third address fails and says which hosts exist."""
    opts = ValidateOptions(registry=deployment.registry_url, expect_hosts=(deployment.host1, "127.0.0.254"),
                           expect_host_count=2, timeout=5)
    results = await collect(opts)
    assert not results[3].passed
    assert "no healthy expected record on host 127.0.0.254" in results[3].detail
    assert results[1].passed and results[7].passed


def test_fair_share_is_half_an_even_split_rounded_up():
    assert validate.fair_share(8, 2) == 2
    assert validate.fair_share(9, 2) == 3
    assert validate.fair_share(12, 3) == 2
    assert validate.fair_share(8, 1) == 4


def test_expect_services_syntax():
    assert validate.parse_services("a:m1,b:m2+m3,c") == (
        ExpectedService("a", ("m1",)), ExpectedService("b", ("m2", "m3")), ExpectedService("c", ()))
    with pytest.raises(validate.UsageError):
        validate.parse_services(" , ")


def test_usage_errors_exit_2(capsys):
    assert validate.main(["--registry", "not-a-url"]) == 2
    assert validate.main(["--lb-requests", "1"]) == 2
    assert validate.main(["--no-such-option"]) == 2
    assert "usage:" in capsys.readouterr().err


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_deployment_exits_1_with_table_and_json(capsys):
    """Nothing listening: every check fails with a reason, the last line counts them, exit code 1."""
    url = f"http://127.0.0.1:{_dead_port()}"
    assert validate.main(["--registry", url, "--router", url, "--timeout", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "0 passed, 9 failed"
    assert any(line.lstrip().startswith("1  registry health") and "FAIL" in line and "cannot reach the registry" in line
               for line in out)
    assert any("skipped: the router at" in line for line in out)
    assert validate.main(["--registry", url, "--router", url, "--timeout", "2", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["passed"], data["failed"]) == (0, 9)
    assert data["checks"][0] == {"number": 1, "name": "registry health", "passed": False, "ran": True,
                                 "detail": data["checks"][0]["detail"]}
    assert "cannot reach the registry" in data["checks"][0]["detail"]


@shared
async def test_every_registered_router_is_checked(deployment):
    """Check 2 passes when a second router agrees, and fails naming a registered router that is dead."""
    await deployment.start_router(deployment.host2, deployment.registry_url)

    async def two_routers_agree() -> bool:
        routers = [r for r in await _records(deployment.registry_url) if r["metadata"].get("type") == "router"]
        if len(routers) != 2:
            return False
        async with aiohttp.ClientSession() as s:
            for r in routers:
                async with s.get(r["metadata"]["url"] + "/health") as resp:
                    if (await resp.json()).get("healthy_services") != "4/4":
                        return False
        return True

    await async_wait_for(two_routers_agree, timeout=20, what="the second router registered and routing")
    results = await collect(ValidateOptions(registry=deployment.registry_url, timeout=5))
    assert results[2].passed and "the other 1 router(s) agree" in results[2].detail, _table(results)

    dead = f"http://{deployment.host2}:{_dead_port()}"
    async with aiohttp.ClientSession() as s:
        await RegistryClient(s, deployment.registry_url).register(
            {"name": "router-dead", "host": deployment.host2, "port": int(dead.rsplit(":", 1)[1]), "url": dead,
             "status": "running", "metadata": {"type": "router", "url": dead}})
    results = await collect(ValidateOptions(registry=deployment.registry_url, timeout=5))
    assert not results[2].passed and f"router {dead} is unreachable" in results[2].detail, _table(results)


@shared
async def test_a_registry_list_is_validated_through_the_first_that_answers(deployment, capsys):
    dead = f"http://127.0.0.1:{_dead_port()}"
    results = await collect(ValidateOptions(registry=f"{dead},{deployment.registry_url}", timeout=5))
    assert results[1].passed and deployment.registry_url in results[1].detail, _table(results)
    assert f"validate: registry {dead}" in capsys.readouterr().err


def test_an_unreachable_registry_is_said_once_and_the_checks_that_need_it_are_not_run(capsys):
    """Without --router, the connection error shows once (check 1); checks 2-9 say they were not run."""
    url = f"http://127.0.0.1:{_dead_port()}"
    assert validate.main(["--registry", url, "--timeout", "2"]) == 1
    text = capsys.readouterr().out
    assert text.count("cannot reach the registry") == 1 and "connection refused" in text
    assert text.count("Cannot connect") == 0
    rows = [ln for ln in text.splitlines() if ln[:3].strip().isdigit()]
    assert len(rows) == 9 and all("SKIP" in ln and "not run" in ln for ln in rows[1:]), rows
    assert text.splitlines()[-1] == "0 passed, 1 failed, 8 not run"
    assert validate.main(["--registry", url, "--timeout", "2", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["passed"], data["failed"], data["not_run"]) == (0, 1, 8)
    assert [c["ran"] for c in data["checks"]] == [True] + [False] * 8
