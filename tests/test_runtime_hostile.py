"""The servers as runtime hosts them, against hostile connections on loopback: malformed framing gets
the JSON envelope, Expect: 100-continue over the limit gets 413 at once, idle and half-sent
connections are closed, the fd limit is raised, and running out of fds is logged once, not per try."""
from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest

from harness import free_port, http_get_json, wait_for, write_toml
from infinilm_svc.config import RegistryConfig
from infinilm_svc.mock.app import create_app as create_mock
from infinilm_svc.mock.options import MockOptions
from infinilm_svc.registry.app import create_app as create_registry
from infinilm_svc.runtime import HostedApp, start_app

HOST = "127.0.0.1"
PY = sys.executable


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, body


async def exchange(port: int, data: bytes, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536) if not until_close else reader.read(), 10)
    finally:
        writer.close()


@pytest.fixture
async def hosted():
    """Start apps exactly as the runtime does (its runner and connection handler)."""
    runners = []

    async def start(app, idle_timeout: float = 60.0) -> int:
        port = free_port()
        runners.append(await start_app(HostedApp("test", "test", app, HOST, port), idle_timeout=idle_timeout))
        return port

    yield start
    for r in runners:
        await r.cleanup()


def registry_app():
    return create_registry(RegistryConfig(bind=HOST, probe_interval=0))


def mock_app():
    return create_mock(MockOptions(name="m", port=1, models=("m",), host=HOST))


MALFORMED = [
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /services HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",
]


@pytest.mark.parametrize("make", [registry_app, mock_app], ids=["registry", "mock"])
@pytest.mark.parametrize("raw", MALFORMED, ids=["bad-length", "length-and-chunked", "bad-name", "huge-header", "tls"])
async def test_malformed_framing_gets_the_json_envelope(hosted, make, raw):
    port = await hosted(make())
    status, headers, body = parse_response(await exchange(port, raw))
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err["code"] == "malformed_request" and err["message"].startswith("malformed HTTP request")


@pytest.mark.parametrize("make, path", [(registry_app, "/services"), (mock_app, "/v1/chat/completions")],
                         ids=["registry", "mock"])
async def test_expect_continue_over_the_limit_is_413_at_once(hosted, make, path):
    port = await hosted(make())
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\nExpect: 100-continue\r\n\r\n").encode()
    status, headers, body = parse_response(await exchange(port, head, until_close=False))
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "body_too_large"


async def test_expect_continue_within_the_limit_still_continues(hosted):
    port = await hosted(registry_app())
    payload = json.dumps({"name": "e", "host": HOST, "port": 9000}).encode()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write((f"POST /services HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\n\r\n").encode())
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 100")
    writer.write(payload)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 201")
    writer.close()


@pytest.mark.parametrize("make, path", [(registry_app, "/services"), (mock_app, "/v1/chat/completions")],
                         ids=["registry", "mock"])
async def test_json_nested_100000_deep_is_a_400_envelope(hosted, make, path):
    port = await hosted(make())
    body = b'{"model": "m", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    status, headers, resp = parse_response(await exchange(port, raw))
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert "nested too deeply" in json.loads(resp)["error"]["message"]


async def test_half_sent_and_idle_connections_are_closed(hosted):
    port = await hosted(registry_app(), idle_timeout=0.5)
    # half a request head, never finished
    r1, w1 = await asyncio.open_connection(HOST, port)
    w1.write(b"GET /health HTTP/1.1\r\nHo")
    await w1.drain()
    # a full request, then silence on a keep-alive connection
    r2, w2 = await asyncio.open_connection(HOST, port)
    w2.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await w2.drain()
    first = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 10)
    assert first.startswith(b"HTTP/1.1 200")
    for reader in (r1, r2):
        rest = await asyncio.wait_for(reader.read(), 10)  # returns when the server closes
        assert reader.at_eof(), rest
    w1.close()
    w2.close()


def _run_limited(procs, tmp_path, soft: int, hard: int):
    port = free_port()
    cfg = write_toml(tmp_path / "registry.toml", {"registry": {"bind": HOST, "port": port, "probe_interval": 0}})
    launcher = ("import resource, os, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
                "os.execv(sys.executable, [sys.executable, '-m', 'infinilm_svc', '--config', sys.argv[1]])"
                % (soft, hard))
    proc = procs.start([PY, "-c", launcher, str(cfg)], name="registry")
    wait_for(lambda: http_get_json(f"http://{HOST}:{port}/health")[0] == 200, what="registry up")
    return proc, port


def _soft_nofile(pid: int) -> int:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


def test_the_soft_fd_limit_is_raised_to_the_hard_one(procs, tmp_path):
    proc, _ = _run_limited(procs, tmp_path, 256, 2048)
    assert _soft_nofile(proc.pid) == 2048


def test_running_out_of_fds_is_logged_once_per_interval_and_the_server_recovers(procs, tmp_path):
    proc, port = _run_limited(procs, tmp_path, 64, 64)
    socks = []
    try:
        for _ in range(150):  # far more than the server can hold
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
        wait_for(lambda: "cannot accept connections" in procs.output(proc), what="the fd exhaustion reported")
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: http_get_json(f"http://{HOST}:{port}/health", timeout=2)[0] == 200, timeout=20,
             what="the registry answering again once the connections are gone")
    out = procs.output(proc)
    assert out.count("cannot accept connections") <= 3, out[-2000:]
    assert out.count("Traceback") == 0, out[-4000:]
