"""A real inference engine in the loop: llama.cpp's llama-server under the babysitter and behind the router.

The engine and its tiny seeded models come from `./build.sh engine` (see tests/engine.py). One test
uses a stand-in engine written here, to hold the 503 "loading" answer for as long as it needs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, http_get_json, http_json, wait_for, write_toml
from test_babysitter import record, start_babysitter, start_registry, status, write_babysitter

PY = sys.executable
# A system prompt long enough (a few hundred tokens) that a cache hit is unmistakable.
SYSTEM = " ".join(f"Rule {i}: answer briefly, cite the manual section {i}, and never guess." for i in range(1, 25))


def engine_backend(engine, model=None, **extra) -> dict:
    return {"type": "llama.cpp", "command": str(engine.server), "model_path": str(model or engine.model_1),
            "models": ["tiny"], "args": ["-c", "4096", "-np", "2"], **extra}


def logs(port: int) -> list[dict]:
    return http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=2000")[1]["lines"]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# --- the babysitter -----------------------------------------------------------------------------

def test_engine_loading_503_is_starting_and_alias_is_the_served_name(procs, tmp_path):
    """/health 503 while the engine loads keeps it "starting" (not a failure); 200 makes it running."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    go = tmp_path / "loaded"
    fake = tmp_path / "fake_llama_server.py"
    fake.write_text(
        "import argparse, http.server, json, os, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--model'); p.add_argument('--host')\n"
        "p.add_argument('--port', type=int); p.add_argument('--alias')\n"
        "a, _ = p.parse_known_args()\n"
        f"GO = {str(go)!r}\n"
        "print('argv', json.dumps(sys.argv[1:]), flush=True)\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        loaded = os.path.exists(GO)\n"
        "        if self.path == '/health':\n"
        "            code, body = (200, {'status': 'ok'}) if loaded else (503, {'error': {'code': 503, 'message': 'Loading model'}})\n"
        "        elif self.path == '/v1/models' and loaded:\n"
        "            code, body = 200, {'object': 'list', 'data': [{'id': a.alias or a.model, 'object': 'model'}]}\n"
        "        else:\n"
        "            code, body = 503, {'error': {'code': 503, 'message': 'Loading model'}}\n"
        "        raw = json.dumps(body).encode(); self.send_response(code)\n"
        "        self.send_header('Content-Length', str(len(raw))); self.end_headers(); self.wfile.write(raw)\n"
        "    def log_message(self, *args): pass\n"
        "http.server.HTTPServer((a.host, a.port), H).serve_forever()\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    cfg = write_babysitter(tmp_path, "bs-load", port, {
        "type": "llama.cpp", "command": f"{PY} {fake}", "model_path": "m.gguf", "models": ["tiny"],
        "args": ["--ctx-size", "256"]}, registry=reg)
    start_babysitter(procs, cfg)
    wait_for(lambda: any(e["line"].startswith("argv ") for e in logs(port)), what="the engine's first line")
    argv = json.loads(next(e["line"] for e in logs(port) if e["line"].startswith("argv "))[5:])
    assert argv == ["--model", str(tmp_path / "m.gguf"), "--host", "127.0.0.1", "--port", str(port),
                    "--alias", "tiny", "--ctx-size", "256"]
    # It answers 503 for a while: still starting, and the registry says so.
    wait_for(lambda: (r := record(reg, "bs-load-server")) and r["status"] == "starting", what="registry: starting")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:   # a window in which a 503 must not count as ready or as a failure
        st = status(port)
        assert st["state"] == "starting" and st["restarts"] == 0, st
        time.sleep(0.1)
    go.touch()
    rec = wait_for(lambda: (r := record(reg, "bs-load-server")) and r["status"] == "running" and r, what="running")
    assert rec["metadata"]["models"] == ["tiny"] and rec["is_healthy"] is True
    assert status(port)["restarts"] == 0


def test_llama_server_lifecycle_starting_running_kill9_backoff_running(engine, procs, tmp_path):
    """The real engine: the registry is truthful at every step, and the engine's log is captured."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    go = tmp_path / "go"
    # The first start waits for the test's go-ahead (so "starting" can be seen); later starts do not.
    hold = f"while [ ! -e {go} ]; do sleep 0.05; done; exec {engine.server} \"$@\""
    backend = engine_backend(engine)
    backend["command"] = f"sh -c '{hold}' llama-server"
    cfg = write_babysitter(tmp_path, "bs-llama", port, backend, registry=reg,
                           policy={"restart_delay": 2.0, "backoff_max": 2.0})
    start_babysitter(procs, cfg)
    rec = wait_for(lambda: (r := record(reg, "bs-llama-server")) and r["status"] == "starting" and r,
                   what="registry: starting")
    assert rec["is_healthy"] is False and status(port)["state"] == "starting"
    go.touch()
    rec = wait_for(lambda: (r := record(reg, "bs-llama-server")) and r["status"] == "running" and r,
                   timeout=30, what="registry: running")
    assert rec["is_healthy"] is True and rec["metadata"]["models"] == ["tiny"]
    pid = rec["metadata"]["pid"]
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "llama-server"
    # The engine answers for itself, and its own log lines are in the babysitter's log.
    code, body = http_json("POST", f"http://127.0.0.1:{port}/v1/completions",
                           {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert code == 200 and body["usage"]["completion_tokens"] == 4
    engine_lines = lambda: [e["line"] for e in logs(port) if e["stream"] in ("stdout", "stderr")]  # noqa: E731
    assert any(f"listening on http://127.0.0.1:{port}" in ln for ln in engine_lines())
    wait_for(lambda: any("print_timing" in ln and "4 tokens" in ln for ln in engine_lines()),
             what="the engine's own log line timing the request")

    os.kill(pid, signal.SIGKILL)
    rec = wait_for(lambda: (r := record(reg, "bs-llama-server")) and r["status"] == "backoff" and r,
                   what="registry: backoff")
    assert rec["is_healthy"] is False
    st = status(port)
    assert st["state"] == "backoff" and st["last_exit_code"] == -9
    rec = wait_for(lambda: (r := record(reg, "bs-llama-server")) and r["status"] == "running" and r,
                   timeout=30, what="registry: running again")
    assert rec["is_healthy"] is True and rec["metadata"]["pid"] != pid and rec["metadata"]["restarts"] == 1


def check_config(*files) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "infinilm_svc", "check-config", *map(str, files)], capture_output=True,
                          text=True, timeout=60)


def test_check_config_names_a_missing_or_non_gguf_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    base = {"type": "llama.cpp", "models": ["tiny"]}
    missing = write_babysitter(tmp_path, "bs-missing", free_port(pair=True), {**base, "model_path": "nope.gguf"})
    text = write_babysitter(tmp_path, "bs-text", free_port(pair=True), {**base, "model_path": "notes.txt"})
    bad = write_babysitter(tmp_path, "bs-bad", free_port(pair=True), {"type": "llama.cpp", "models": ["a", "b"],
                                                                       "health_path": "/ping", "command": " "})
    out = check_config(missing, text, bad)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    line = missing.read_text().splitlines().index('model_path = "nope.gguf"') + 1
    assert f"{missing}:{line}: backend.model_path: model file {tmp_path / 'nope.gguf'}: No such file or directory" in lines
    assert any(f"model file {tmp_path / 'notes.txt'} is not a GGUF file" in ln and ln.startswith(str(text)) for ln in lines)
    for key, words in (("model_path", "needs model_path"), ("models", "one model"), ("health_path", "own /health"),
                       ("command", "must not be empty")):
        assert any(ln.startswith(str(bad)) and f"backend.{key}:" in ln and words in ln for ln in lines), (key, lines)
    good = write_babysitter(tmp_path, "bs-good", free_port(pair=True), {**base, "model_path": "m.gguf"})
    assert check_config(good).returncode == 0


def test_missing_model_engine_error_in_status_then_fatal(engine, procs, tmp_path):
    """At run time the engine's own error line is in /status, and the babysitter ends FATAL."""
    port = free_port(pair=True)
    missing = write_babysitter(tmp_path, "bs-missing", port, engine_backend(engine, model=tmp_path / "nope.gguf"),
                               policy={"max_restarts": 1})
    start_babysitter(procs, missing)
    st = wait_for(lambda: (s := status(port))["state"] == "fatal" and s, timeout=30, what="FATAL")
    assert st["restarts"] == 1 and st["last_exit_code"] not in (0, None)
    engine_lines = [e["line"].strip() for e in logs(port) if e["stream"] in ("stdout", "stderr")]
    assert st["last_error_line"] in engine_lines, (st["last_error_line"], engine_lines[-10:])
    assert "nope.gguf" in st["last_error_line"] or "model" in st["last_error_line"].lower()
    assert st["last_exit_reason"].startswith("exited with code")


# --- behind the router --------------------------------------------------------------------------

def start_node(procs, tmp_path, engine, model=None):
    """One pyz process: registry, router and a babysitter running llama-server."""
    reg, rtr, port = free_port(), free_port(), free_port(pair=True)
    sitter = write_babysitter(tmp_path, "bs-eng", port, engine_backend(engine, model=model), registry=reg)
    node = write_toml(tmp_path / "node.toml", {
        "babysitters": [sitter.name],
        "registry": {"bind": "127.0.0.1", "port": reg, "heartbeat_ttl": 5, "sweep_interval": 0.2},
        "router": {"bind": "127.0.0.1", "port": rtr, "registry_url": f"http://127.0.0.1:{reg}",
                   "heartbeat_interval": 0.5, "health_interval": 0.5}})
    procs.pyz("--config", str(node), name="node")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{rtr}/health")[0] == 200, timeout=30, what="router up")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{rtr}/stats")[1].get("healthy_services") == 1,
             timeout=30, what="the engine routable")
    return rtr, port


@pytest.mark.e2e
def test_router_streams_a_real_answer_through_the_openai_sdk(engine, pyz_path, procs, tmp_path):
    import openai

    rtr, port = start_node(procs, tmp_path, engine)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{rtr}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["X-InfiniLM-Backend"] == "bs-eng-server"
    text, chunks, usage = "", 0, None
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks > 1 and usage is not None and usage.completion_tokens == 12
    # The same request straight to the engine, not streamed: the router relayed the very answer.
    code, direct = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                             {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0})
    assert code == 200 and text == direct["choices"][0]["message"]["content"] and text.strip()


@pytest.mark.e2e
def test_engine_cached_tokens_in_router_stats_and_metrics(engine, pyz_path, procs, tmp_path):
    """A repeated prompt: the engine reports cached prompt tokens; /stats and /metrics sum what it said."""
    rtr, _ = start_node(procs, tmp_path, engine)
    url = f"http://127.0.0.1:{rtr}/v1/chat/completions"
    seen = []
    for i, stream in enumerate((False, False, True)):
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
            code, raw = http_json("POST", url, body, timeout=30)
            events = [json.loads(ln[6:]) for ln in raw.splitlines() if ln.startswith("data: {")]
            usage = next(e["usage"] for e in events if e.get("usage"))
        else:
            code, answer = http_json("POST", url, body, timeout=30)
            usage = answer["usage"]
        assert code == 200
        seen.append(usage)
    cached = [u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in seen]
    assert cached[0] == 0 and cached[1] > 100 and cached[2] > 100, seen   # the system prompt came from the cache
    stats = http_get_json(f"http://127.0.0.1:{rtr}/stats")[1]
    prompt = sum(u["prompt_tokens"] for u in seen)
    want = {"prompt": prompt, "completion": sum(u["completion_tokens"] for u in seen), "cached": sum(cached),
            "answers_with_usage": 3}
    for counters in (stats["services"][0], stats["models"]["tiny"]):
        assert counters["tokens"] == want
        assert counters["cache_hit_ratio"] == round(sum(cached) / prompt, 4)
    code, text = http_get_json(f"http://127.0.0.1:{rtr}/metrics")
    samples = metric_samples(text)
    assert samples[("infinilm_router_backend_tokens_total", (("backend", "bs-eng-server"), ("type", "cached")))] == sum(cached)
    assert samples[("infinilm_router_model_tokens_total", (("model", "tiny"), ("type", "cached")))] == sum(cached)
    assert samples[("infinilm_router_model_cache_hit_ratio", (("model", "tiny"),))] == pytest.approx(sum(cached) / prompt)


def test_usage_of_reads_cached_prompt_tokens_in_any_key_order():
    """usage.prompt_tokens_details.cached_tokens, as llama-server, vLLM and OpenAI place it."""
    from infinilm_svc.router.stats import Counters, usage_of

    llama = (b'{"choices":[],"usage":{"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":269},'
             b'"prompt_tokens":288,"total_tokens":292},"timings":{"cache_n":269,"prompt_n":19}}')
    chunk = b'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":2,"total_tokens":32,' \
            b'"prompt_tokens_details":{"cached_tokens":0}}}\n\ndata: [DONE]\n\n'
    plain = b'{"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}'
    assert usage_of(llama) == (288, 4, 269)
    assert usage_of(chunk) == (30, 2, 0)
    assert usage_of(plain) == (7, 3, None)   # says nothing about a cache
    quiet = Counters()
    quiet.add_tokens(usage_of(plain))
    assert quiet.cache_hit_ratio is None and quiet.to_json()["tokens"]["cached"] is None
    assert usage_of(b'{"choices":[{"delta":{"content":"prompt_tokens"}}]}') is None
    c = Counters()
    assert c.cache_hit_ratio is None
    for u in (usage_of(llama), usage_of(chunk), usage_of(plain), None):
        c.add_tokens(u)
    assert c.to_json()["tokens"] == {"prompt": 325, "completion": 9, "cached": 269, "answers_with_usage": 3}
    assert c.to_json()["cache_hit_ratio"] == round(269 / 325, 4)


def test_demo_llama_cpp_configs_check_with_the_built_engine(engine):
    from harness import ROOT

    cfg = ROOT / "demo" / "integration-validation" / "config-llama.cpp"
    env = {**os.environ, "INFINILM_ENGINE_DIR": str(engine.server.parent.parent)}
    out = subprocess.run([PY, "-m", "infinilm_svc", "check-config", str(cfg / "server1.toml"), str(cfg / "server2.toml")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "babysitter babysitter-d (backend llama.cpp" in out.stdout, out.stdout
    env.pop("INFINILM_ENGINE_DIR")
    env["INFINILM_ENGINE_DIR"] = str(engine.server.parent.parent / "nowhere")
    out = subprocess.run([PY, "-m", "infinilm_svc", "check-config", str(cfg / "server1.toml")],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "nowhere/models/tiny-llama-s1.gguf: No such file or directory" in out.stdout


@pytest.mark.e2e
def test_engine_killed_mid_stream_client_gets_error_event_and_babysitter_restarts_it(engine, pyz_path, procs, tmp_path):
    import http.client

    rtr, port = start_node(procs, tmp_path, engine)
    pid = status(port)["pid"]
    conn = http.client.HTTPConnection("127.0.0.1", rtr, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}], "stream": True,
        "max_tokens": 1500, "ignore_eos": True, "temperature": 0}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events, killed = [], False
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        events.append(line[6:])
        if len(events) == 5 and not killed:
            os.kill(pid, signal.SIGKILL)        # mid-stream: the engine is gone at once
            killed = True
    conn.close()
    assert killed and "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_stream_error", events[-3:]
    content = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in content for ch in c["choices"] if ch["delta"].get("content")) < 1500
    st = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"] not in (None, pid) and s, timeout=30,
                  what="the babysitter to restart the engine")
    assert st["restarts"] == 1 and st["last_exit_code"] == -9, st
