"""The mock backend: OpenAI shapes, streaming, errors, its log line, and its misbehaviour knobs."""
from __future__ import annotations

import json
import sys
from http.client import HTTPException

import pytest

from harness import free_port, http_get_json, http_json, wait_for
from infinilm_svc.mock.app import create_app
from infinilm_svc.mock.cli import parse_options
from infinilm_svc.mock.options import MockOptions


def make_client(aiohttp_client, **kw):
    opts = MockOptions(name=kw.pop("name", "mock-a"), port=1, models=kw.pop("models", ("model-1", "model-2")), **kw)
    return aiohttp_client(create_app(opts))


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_models_lists_the_configured_models_on_both_paths(aiohttp_client):
    client = await make_client(aiohttp_client)
    for path in ("/v1/models", "/models"):
        resp = await client.get(path)
        body = await resp.json()
        assert resp.status == 200
        assert [m["id"] for m in body["data"]] == ["model-1", "model-2"]
    resp = await client.get("/health")
    assert resp.status == 200 and (await resp.json())["service"] == "mock-a"


async def test_chat_answer_names_the_service_and_model_and_fills_usage(aiohttp_client):
    client = await make_client(aiohttp_client)
    for path in ("/v1/chat/completions", "/chat/completions"):
        resp = await client.post(path, json={"model": "model-2", "messages": [{"role": "user", "content": "hi there"}]})
        body = await resp.json()
        assert resp.status == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "Hello from mock-a (model: model-2)"
        assert body["usage"]["prompt_tokens"] == 2
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 2


async def test_chat_stream_sends_chunks_then_done(aiohttp_client):
    client = await make_client(aiohttp_client, chunks=7)
    resp = await client.post("/v1/chat/completions", json={
        "model": "model-1", "stream": True, "messages": [{"role": "user", "content": "x"}],
        "stream_options": {"include_usage": True}})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for c in content if c) == 7
    assert "".join(c or "" for c in content).startswith("Hello from mock-a (model: model-1)")
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7


async def test_stream_has_no_usage_only_chunk_unless_asked(aiohttp_client):
    client = await make_client(aiohttp_client)
    for options in (None, {"include_usage": False}, "yes"):
        body = {"model": "model-1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        if options is not None:
            body["stream_options"] = options
        events = sse_events(await (await client.post("/v1/chat/completions", json=body)).text())
        assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1]), options


async def test_completions_with_and_without_stream(aiohttp_client):
    client = await make_client(aiohttp_client)
    for path in ("/v1/completions", "/completions"):
        resp = await client.post(path, json={"model": "model-1", "prompt": "say hi"})
        body = await resp.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "Hello from mock-a (model: model-1)"
        resp = await client.post(path, json={"model": "model-1", "prompt": "say hi", "stream": True})
        events = sse_events(await resp.text())
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello from mock-a (model: model-1)"
        assert all(e["object"] == "text_completion" for e in events[:-1])


async def test_embeddings_are_deterministic_unit_vectors(aiohttp_client):
    client = await make_client(aiohttp_client, embedding_dim=8)
    resp = await client.post("/v1/embeddings", json={"model": "model-1", "input": ["alpha", "beta", "alpha"]})
    body = await resp.json()
    assert resp.status == 200
    vecs = [d["embedding"] for d in body["data"]]
    assert len(vecs) == 3 and all(len(v) == 8 for v in vecs)
    assert vecs[0] == vecs[2] != vecs[1]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-3
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", {"messages": []}, 400, "missing_field"),
    ("/v1/chat/completions", {"model": "model-1"}, 400, "missing_field"),
    ("/v1/completions", {"model": "model-1"}, 400, "missing_field"),
    ("/v1/embeddings", {"model": "model-1"}, 400, "missing_field"),
])
async def test_errors_use_the_openai_envelope(aiohttp_client, path, body, status, code):
    client = await make_client(aiohttp_client)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    err = (await resp.json())["error"]
    assert resp.status == status
    assert err["code"] == code and err["message"] and err["type"]


@pytest.mark.parametrize("path,body,message", [
    ("/v1/chat/completions", {"model": "model-1", "messages": "hi"}, "messages must be a non-empty array, got a string"),
    ("/v1/chat/completions", {"model": "model-1", "messages": []}, "messages must be a non-empty array, got an empty array"),
    ("/v1/chat/completions", {"model": "model-1", "messages": {"role": "user"}}, "messages must be a non-empty array, got an object"),
    ("/v1/completions", {"model": "model-1", "prompt": 7}, "prompt must be a string or an array, got a number"),
])
async def test_a_field_of_the_wrong_type_is_not_called_missing(aiohttp_client, path, body, message):
    """A present field of the wrong type says what it must be, not that it is missing."""
    client = await make_client(aiohttp_client)
    resp = await client.post(path, json=body)
    err = (await resp.json())["error"]
    assert resp.status == 400
    assert err["message"] == message and err["code"] == "invalid_value"


async def test_answers_are_compact_json(aiohttp_client):
    """No space after `:` or `,`, as upstream's services write it (its scripts grep `"name":"...`)."""
    client = await make_client(aiohttp_client)
    chat = await (await client.post("/v1/chat/completions",
                                    json={"model": "model-1", "messages": [{"role": "user", "content": "x"}]})).text()
    models = await (await client.get("/v1/models")).text()
    error = await (await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})).text()
    for text in (chat, models, error):
        assert '": ' not in text and '", "' not in text, text
    assert '"object":"chat.completion"' in chat and '"id":"model-1"' in models and '"error":{' in error


async def test_fail_rate_one_answers_500(aiohttp_client):
    client = await make_client(aiohttp_client, fail_rate=1.0)
    resp = await client.post("/v1/completions", json={"model": "model-1", "prompt": "x"})
    assert resp.status == 500
    assert (await resp.json())["error"]["type"] == "server_error"


async def test_one_log_line_per_request_with_request_id(aiohttp_client, capsys):
    client = await make_client(aiohttp_client)
    await client.post("/v1/chat/completions", headers={"X-Request-ID": "req-42"},
                      json={"model": "model-1", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    await client.post("/v1/completions", json={"model": "zzz", "prompt": "x"})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("request ")]
    assert lines == [
        "request id=req-42 method=POST path=/v1/chat/completions model=model-1 stream=true status=200",
        "request id=- method=POST path=/v1/completions model=zzz stream=false status=404",
    ]


def test_cli_rejects_bad_flags():
    with pytest.raises(SystemExit) as exc:
        parse_options(["--name", "a", "--port", "8100", "--models", ","])
    assert exc.value.code == 2
    for bad in (["--embedding-dim", "0"], ["--chunks", "0"], ["--crash-after", "-1"], ["--hang-after", "-2"]):
        with pytest.raises(SystemExit) as exc:
            parse_options(["--name", "a", "--port", "8100", "--models", "m", *bad])
        assert exc.value.code == 2, bad
    opts = parse_options(["--name", "a", "--port", "8100", "--models", "m1, m2", "--hang-after", "3"])
    assert opts.models == ("m1", "m2") and opts.hang_after == 3 and opts.host == "127.0.0.1"


def _mock(procs, port: int, *extra: str):
    return procs.start([sys.executable, "-m", "infinilm_svc", "mock", "--name", "mock-p", "--port", str(port),
                        "--models", "model-1", "--host", "127.0.0.1", *extra], name="mock")


def test_crash_after_exits_with_code_3(procs):
    port = free_port()
    proc = _mock(procs, port, "--crash-after", "2")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="mock up")  # request 1
    assert http_json("POST", f"http://127.0.0.1:{port}/v1/completions", {"model": "model-1", "prompt": "x"})[0] == 200
    with pytest.raises((OSError, HTTPException)):
        http_get_json(f"http://127.0.0.1:{port}/health")  # request 3: the process exits instead
    assert proc.wait(timeout=10) == 3
    assert "crashing after 2 requests" in procs.output(proc)


def test_hang_after_stops_answering_but_keeps_running(procs):
    port = free_port()
    proc = _mock(procs, port, "--hang-after", "1", "--startup-delay", "0.2")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="mock up")
    with pytest.raises(OSError):  # a timeout: it accepted the connection and never answered
        http_get_json(f"http://127.0.0.1:{port}/v1/models", timeout=0.5)
    assert proc.poll() is None
    out = procs.output(proc)
    assert "waiting 0.2 s before listening" in out and "hanging after 1 requests" in out


def test_serving_is_printed_only_once_listening(procs):
    """A mock that cannot bind its port says why and never claims to be serving."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _mock(procs, port)
        assert proc.wait(timeout=20) == 1
    out = procs.output(proc)
    assert "cannot listen on 127.0.0.1" in out
    assert "serving" not in out
    port = free_port()
    proc = _mock(procs, port)
    wait_for(lambda: "mock mock-p: serving model-1 on http://127.0.0.1:" in procs.output(proc), what="serving line")
    assert http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200


def test_the_openai_sdk_talks_to_the_mock(procs):
    openai = pytest.importorskip("openai")
    port = free_port()
    _mock(procs, port)
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="mock up")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(model="model-1", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "Hello from mock-p (model: model-1)"
    stream = client.chat.completions.create(model="model-1", stream=True, messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from mock-p (model: model-1)"
    assert [m.id for m in client.models.list()] == ["model-1"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
