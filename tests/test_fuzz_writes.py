"""Fuzz every write endpoint of the registry, the babysitter and the mock, each a real process, with
random JSON, hostile records, names, headers and framing: never a 5xx, never a dead process, the
registry's table unchanged by every rejected request, and GET /services always strict JSON."""
from __future__ import annotations

import json
import re
import sys
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_http import (
    AUTH_HEADERS,
    BODIES,
    NAMES,
    RAW_REQUESTS,
    RECORDS,
    check_answer,
    check_raw_answer,
    encode_json,
    path_segment,
    request,
    send_raw,
    strict_json,
)
from harness import free_port, http_get_json, wait_for, write_toml
from test_babysitter import MOCK, start_babysitter, write_babysitter

HOST = "127.0.0.1"
PY = sys.executable
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@-]{0,252}")


@pytest.fixture
def registry(procs, tmp_path):
    port = free_port()
    cfg = write_toml(tmp_path / "registry.toml", {"registry": {
        "bind": HOST, "port": port, "probe_interval": 0, "max_services": 50, "heartbeat_ttl": 3600,
        "expire_after": 7200}})
    proc = procs.start([PY, "-m", "infinilm_svc", "--config", str(cfg)], name="registry")
    wait_for(lambda: http_get_json(f"http://{HOST}:{port}/health")[0] == 200, what="registry up")
    return proc, port


def table(port: int) -> tuple[int, dict]:
    """The registry's index and records, parsed strictly; every record usable by a router."""
    status, _, raw = request(HOST, port, "GET", "/services")
    assert status == 200
    body = strict_json(raw)
    records = {}
    for s in body["services"]:
        assert SAFE_NAME.fullmatch(s["name"]), s["name"]
        u = urlsplit(s["url"])
        assert u.scheme in ("http", "https") and u.hostname and 1 <= (u.port or 80) <= 65535, s["url"]
        records[s["name"]] = json.dumps({k: s[k] for k in ("host", "port", "url", "hostname", "status", "metadata")},
                                        sort_keys=True)
    return body["index"], records


FIXED = {"name": "fixed", "host": HOST, "port": 8100, "metadata": {"type": "openai-api", "models": ["m"]}}


def ensure_fixed(port: int) -> None:
    if request(HOST, port, "GET", "/services/fixed")[0] == 404:
        assert request(HOST, port, "POST", "/services", encode_json(FIXED))[0] == 201


WRITES = st.one_of(
    st.tuples(st.just("POST"), st.just("/services"), BODIES | RECORDS.map(encode_json)),
    st.tuples(st.just("PUT"), st.just("/services/fixed"), BODIES),
    st.tuples(st.just("POST"), st.just("/services/fixed/heartbeat"), BODIES),
    st.tuples(st.just("PUT"), NAMES.map(lambda n: "/services/" + path_segment(n)), BODIES),
    st.tuples(st.just("POST"), NAMES.map(lambda n: "/services/" + path_segment(n) + "/heartbeat"), BODIES),
    st.tuples(st.just("DELETE"), NAMES.filter(lambda n: n != "fixed").map(lambda n: "/services/" + path_segment(n)),
              st.just(b"")),
)


def test_fuzz_registry_writes(registry):
    proc, port = registry

    @FUZZ
    @given(WRITES)
    def one(write):
        method, path, body = write
        ensure_fixed(port)
        before = table(port)
        status, headers, raw = request(HOST, port, method, path, body)
        check_answer(status, headers, raw, f"{method} {path} {body[:200]!r}")
        after = table(port)
        if status >= 400:
            assert after == before, f"{method} {path} {body[:200]!r} was refused ({status}) but changed the table"
        assert proc.poll() is None

    one()


def test_fuzz_registry_framing(registry):
    proc, port = registry

    @FUZZ
    @given(RAW_REQUESTS)
    def one(raw):
        before = table(port)
        check_raw_answer(send_raw(HOST, port, raw), repr(raw[:200]))
        assert table(port) == before
        assert proc.poll() is None

    one()


@pytest.fixture
def babysitter(procs, tmp_path):
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-fuzz", port, MOCK, top={"token": "tok"})
    proc = start_babysitter(procs, cfg)
    wait_for(lambda: http_get_json(f"http://{HOST}:{port + 1}/health")[0] == 200, what="babysitter running")
    return proc, port + 1


def test_fuzz_babysitter_writes_and_logs(babysitter):
    proc, port = babysitter
    queries = st.sampled_from(["", "?tail=-1", "?tail=abc", "?tail=99999999999999999999", "?follow=maybe&tail=1",
                               "?tail=", "?tail=1e3"])

    @FUZZ
    @given(st.sampled_from(["/restart", "/stop", "/start"]), BODIES, AUTH_HEADERS, queries)
    def one(path, body, auth, query):
        headers = {"Authorization": auth} if auth else {}
        status, h, raw = request(HOST, port, "POST", path, body, headers)
        check_answer(status, h, raw, f"POST {path} auth={auth!r}")
        assert status == 401, (path, auth, status)  # no fuzzed header is the token
        status, h, raw = request(HOST, port, "GET", "/logs" + query, None, {"Authorization": "Bearer tok"})
        check_answer(status, h, raw, f"GET /logs{query}")
        check_raw_answer(send_raw(HOST, port, b"POST /stop HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n"))
        assert proc.poll() is None

    one()
    status, body = http_get_json(f"http://{HOST}:{port}/status")
    assert status == 200 and body["state"] == "running"  # nothing fuzzed stopped the backend


@pytest.fixture
def mock(procs):
    port = free_port()
    proc = procs.start([PY, "-m", "infinilm_svc", "mock", "--name", "m", "--port", str(port), "--host", HOST,
                        "--models", "m"], name="mock")
    wait_for(lambda: http_get_json(f"http://{HOST}:{port}/health")[0] == 200, what="mock up")
    return proc, port


def test_fuzz_mock_writes(mock):
    proc, port = mock
    chat = st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["m", "nope", ""]) | st.text(max_size=8) | st.integers(),
        "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.text(max_size=8), "content": st.text(max_size=40) | st.integers() | st.none()}), max_size=3) | st.text(max_size=5),
        "prompt": st.text(max_size=40) | st.lists(st.text(max_size=8), max_size=3) | st.integers(),
        "input": st.text(max_size=40) | st.lists(st.text(max_size=8) | st.integers(), max_size=3) | st.none(),
        "stream": st.booleans() | st.text(max_size=3),
        "max_tokens": st.integers(min_value=-5, max_value=2 ** 40) | st.text(max_size=3),
        "stream_options": st.dictionaries(st.text(max_size=12), st.booleans() | st.integers(), max_size=2) | st.integers(),
    }).map(encode_json)

    @FUZZ
    @given(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/chat/completions"]),
           chat | BODIES)
    def one(path, body):
        status, h, raw = request(HOST, port, "POST", path, body, {"Connection": "close"})
        check_answer(status, h, raw, f"POST {path} {body[:200]!r}")
        assert proc.poll() is None

    one()

    @FUZZ
    @given(RAW_REQUESTS)
    def framing(raw):
        check_raw_answer(send_raw(HOST, port, raw), repr(raw[:200]))
        assert proc.poll() is None

    framing()
