"""The babysitter with real processes: restarts, FATAL, hangs, registry truth, shutdown, logs, API."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, http_get_json, http_json, wait_for, write_toml

PY = sys.executable
FAST = {"restart_delay": 0.05, "backoff_max": 0.2, "heartbeat_interval": 0.3, "health_interval": 0.2,
        "health_timeout": 0.5, "startsecs": 30, "stop_timeout": 3}


def write_babysitter(tmp_path: Path, name: str, port: int, backend: dict, registry: int | None = None,
                     policy: dict | None = None, top: dict | None = None, env: dict | None = None,
                     metadata: dict | None = None, base: dict | None = None) -> Path:
    """A babysitter file; the `[babysitter]` table is `base` (default: the fast FAST timings) plus `policy`."""
    data: dict = {"name": name, "host": "127.0.0.1", "bind": "127.0.0.1", "port": port}
    if registry:
        data["registry_url"] = f"http://127.0.0.1:{registry}"
    data.update(top or {})
    data["babysitter"] = {**(FAST if base is None else base), **(policy or {})}
    data["backend"] = dict(backend)
    if env:
        data["backend"]["env"] = env
    if metadata:
        data["metadata"] = metadata
    return write_toml(tmp_path / f"{name}.toml", data)


def start_registry(procs, tmp_path: Path, port: int | None = None, token: str | None = None):
    port = port or free_port()
    cfg = write_toml(tmp_path / f"registry-{port}.toml", {"registry": {
        "bind": "127.0.0.1", "port": port, "heartbeat_ttl": 2, "expire_after": 10, "sweep_interval": 0.1,
        "probe_interval": 0, **({"token": token} if token else {})}})
    proc = procs.start([PY, "-m", "infinilm_svc", "--config", str(cfg)], name="registry")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="registry up")
    return proc, port


def start_babysitter(procs, cfg: Path, *extra: str):
    return procs.start([PY, "-m", "infinilm_svc", "--config", str(cfg), *extra], name="babysitter")


def record(reg: int, name: str):
    code, body = http_get_json(f"http://127.0.0.1:{reg}/services/{name}")
    return body if code == 200 else None


def status(port: int) -> dict:
    return http_get_json(f"http://127.0.0.1:{port + 1}/status")[1]


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """The babysitter's /metrics as {(sample name, sorted labels): value}, parsed as Prometheus would."""
    code, text = http_get_json(f"http://127.0.0.1:{port + 1}/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


MOCK = {"type": "mock", "models": ["model-1"]}


def test_kill9_backend_registry_shows_it_down_then_running_again(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-kill", port, MOCK, registry=reg, policy={"restart_delay": 1.0, "backoff_max": 1.0},
                           metadata={"cache_type": "paged"})
    start_babysitter(procs, cfg)
    rec = wait_for(lambda: (r := record(reg, "bs-kill-server")) and r["status"] == "running" and r, what="backend running")
    meta = rec["metadata"]
    assert rec["port"] == port and rec["is_healthy"] is True
    assert meta["type"] == "openai-api" and meta["models"] == ["model-1"] and meta["cache_type"] == "paged"
    assert meta["babysitter_url"] == f"http://127.0.0.1:{port + 1}" and meta["restarts"] == 0
    assert record(reg, "bs-kill")["port"] == port + 1
    pid = meta["pid"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    down = wait_for(lambda: (r := record(reg, "bs-kill-server")) and r["status"] != "running" and r,
                    what="registry to show the backend not running")
    print(f"registry showed {down['status']!r} {time.monotonic() - killed:.3f} s after kill -9")
    assert down["is_healthy"] is False
    healthy = http_get_json(f"http://127.0.0.1:{reg}/services?healthy=true")[1]["services"]
    assert "bs-kill-server" not in [s["name"] for s in healthy]
    back = wait_for(lambda: (r := record(reg, "bs-kill-server")) and r["status"] == "running" and r,
                    what="backend running again")
    assert back["metadata"]["restarts"] == 1 and back["metadata"]["pid"] != pid
    st = status(port)
    assert st["last_exit_code"] == -9 and st["restarts"] == 1 and st["state"] == "running"


def test_backend_that_exits_at_once_ends_fatal_until_started(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-exit", port, {"type": "command", "command": PY,
                                                      "args": ["-c", "import sys; print('bye'); sys.exit(7)"]},
                           registry=reg, policy={"max_restarts": 2})
    start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port))["state"] == "fatal" and s, what="FATAL")
    assert st["restarts"] == 2 and st["last_exit_code"] == 7
    assert st["last_error_line"] == "bye" and st["last_exit_reason"] == "exited with code 7"
    code, health = http_get_json(f"http://127.0.0.1:{port + 1}/health")
    assert code == 503 and health["state"] == "fatal"
    wait_for(lambda: (r := record(reg, "bs-exit-server")) and r["status"] == "fatal", what="registry shows fatal")
    lines = [e["line"] for e in http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=100")[1]["lines"]]
    assert lines.count("bye") == 3
    assert any("FATAL" in ln and "max_restarts = 2" in ln for ln in lines)
    # POST /start leaves FATAL and tries again (three more quick failures -> FATAL again).
    assert http_json("POST", f"http://127.0.0.1:{port + 1}/start")[0] == 202
    st = wait_for(lambda: (s := status(port))["state"] == "fatal" and s["restarts"] == 5 and s, what="FATAL again")
    assert st["last_exit_code"] == 7


def test_hung_backend_is_restarted(procs, tmp_path):
    port = free_port(pair=True)
    # Readiness takes one request, so the mock hangs on its third liveness probe.
    cfg = write_babysitter(tmp_path, "bs-hang", port, {**MOCK, "mock_options": ["--hang-after", "3"]},
                           policy={"liveness_failures": 2, "health_timeout": 0.3})
    start_babysitter(procs, cfg)
    first = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], what="running")
    st = wait_for(lambda: (s := status(port))["restarts"] >= 1 and s["state"] == "running" and s, timeout=20,
                  what="a restart after the hang")
    assert st["pid"] != first
    assert "not answering: 2 liveness probes failed" in st["last_exit_reason"]
    lines = [e["line"] for e in http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=500")[1]["lines"]]
    assert any("liveness probe failed (2/2)" in ln for ln in lines)
    assert not alive(first)


def test_backend_never_ready_is_killed_after_ready_timeout(procs, tmp_path):
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-slow", port, {"type": "command", "command": f"{PY} -c",
                                                      "args": ["import signal; print('loading', flush=True); signal.pause()"]},
                           policy={"ready_timeout": 0.5})
    start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port))["restarts"] >= 1 and s["last_exit_reason"] and s, what="a restart")
    assert "not ready within ready_timeout = 0.5 s" in st["last_exit_reason"]
    assert st["state"] != "running"


def test_registry_restart_records_are_back(procs, tmp_path):
    reg_proc, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-reg", port, MOCK, registry=reg)
    start_babysitter(procs, cfg)
    wait_for(lambda: (r := record(reg, "bs-reg-server")) and r["status"] == "running", what="registered")
    reg_proc.send_signal(signal.SIGTERM)
    reg_proc.wait(timeout=10)
    start_registry(procs, tmp_path, reg)
    restarted = time.monotonic()
    wait_for(lambda: record(reg, "bs-reg") and (r := record(reg, "bs-reg-server")) and r["status"] == "running",
             what="both records back after the registry restart")
    print(f"records back {time.monotonic() - restarted:.3f} s after the new registry answered (heartbeat 0.3 s)")
    rec = record(reg, "bs-reg-server")
    assert rec["metadata"]["models"] == ["model-1"] and rec["is_healthy"] is True


def test_unreachable_registry_does_not_stop_supervision(procs, tmp_path):
    """Supervision goes on while the registry is down; once it answers, both records appear and the error clears."""
    port, reg = free_port(pair=True), free_port()
    cfg = write_babysitter(tmp_path, "bs-noreg", port, MOCK, registry=reg)
    start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port))["state"] == "running" and s["registry"]["last_error"] and s,
                  what="running while the registry is down")
    assert st["registry"]["registered"] is False
    assert http_get_json(f"http://127.0.0.1:{port + 1}/health")[0] == 200
    start_registry(procs, tmp_path, reg)
    wait_for(lambda: (r := record(reg, "bs-noreg-server")) and r["status"] == "running", what="registered late")
    st = wait_for(lambda: (s := status(port))["registry"]["last_error"] is None and s, what="the error cleared")
    assert st["registry"]["registered"] is True and st["registry"]["last_ok"]


def test_sigterm_deregisters_both_and_leaves_no_child(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-term", port, MOCK, registry=reg)
    bs = start_babysitter(procs, cfg)
    rec = wait_for(lambda: (r := record(reg, "bs-term-server")) and r["status"] == "running" and r, what="running")
    child = rec["metadata"]["pid"]
    assert record(reg, "bs-term") is not None
    bs.send_signal(signal.SIGTERM)
    assert bs.wait(timeout=15) == 0
    assert record(reg, "bs-term") is None and record(reg, "bs-term-server") is None
    assert not alive(child)
    with pytest.raises(ProcessLookupError):
        os.killpg(child, 0)  # nothing left in the backend's process group either


# A backend that serves a one-model list on port argv[1]; the scripts below put their signal traps before it.
SERVE_MODELS = """\
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

STUBBORN = """\
import http.server, json, signal, sys
signal.signal(signal.SIGTERM, lambda *a: print("ignoring TERM", flush=True))
""" + SERVE_MODELS


def test_stop_timeout_kills_a_backend_that_ignores_term(procs, tmp_path):
    port = free_port(pair=True)
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    cfg = write_babysitter(tmp_path, "bs-stubborn", port, {"type": "command", "command": PY,
                                                          "args": [str(script), str(port)]},
                           policy={"stop_timeout": 0.5})
    bs = start_babysitter(procs, cfg)
    pid = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], what="running")
    bs.send_signal(signal.SIGTERM)
    assert bs.wait(timeout=15) == 0
    assert not alive(pid)
    log = (tmp_path / "logs" / "bs-stubborn.log").read_text()
    assert "ignoring TERM" in log and "did not stop within 0.5 s; killing it" in log


def test_command_args_env_and_work_dir_are_passed_as_given(procs, tmp_path):
    port = free_port(pair=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "launch.py").write_text(
        "import os, sys\n"
        "print('argv=' + repr(sys.argv[1:]), 'cwd=' + os.getcwd(), 'FOO=' + os.environ['FOO'], flush=True)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'infinilm_svc', 'mock'] + sys.argv[1:])\n")
    cfg = write_babysitter(tmp_path, "bs-cmd", port, {
        "type": "command", "command": f'"{PY}" launch.py', "work_dir": "work",
        "args": ["--name", "mock with spaces", "--port", str(port), "--models", "m-1", "--host", "127.0.0.1"]},
        env={"FOO": "bar baz"})
    start_babysitter(procs, cfg)
    wait_for(lambda: status(port)["state"] == "running", what="running")
    lines = [e["line"] for e in http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=50")[1]["lines"]]
    first = next(ln for ln in lines if ln.startswith("argv="))
    assert "'mock with spaces'" in first and f"cwd={work}" in first and "FOO=bar baz" in first
    code, body = http_json("POST", f"http://127.0.0.1:{port}/v1/completions", {"model": "m-1", "prompt": "x"})
    assert body["choices"][0]["text"] == "Hello from mock with spaces (model: m-1)"
    code, models = http_get_json(f"http://127.0.0.1:{port + 1}/models")
    assert code == 200 and [m["id"] for m in models["data"]] == ["m-1"]


def test_declared_models_with_health_path(procs, tmp_path):
    """A backend without a model list is judged ready by its health path and registered with declared models."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    server = tmp_path / "plain.py"
    server.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200 if self.path == '/ping' else 404); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    cfg = write_babysitter(tmp_path, "bs-embed", port, {"type": "command", "command": PY,
                                                       "args": [str(server), str(port)], "models": ["embed-1"],
                                                       "health_path": "/ping"}, registry=reg)
    start_babysitter(procs, cfg)
    rec = wait_for(lambda: (r := record(reg, "bs-embed-server")) and r["status"] == "running" and r, what="running")
    assert rec["metadata"]["models"] == ["embed-1"]
    assert rec["metadata"]["models_list"][0]["id"] == "embed-1"


def test_restart_stop_start_need_the_token(procs, tmp_path):
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-tok", port, MOCK, top={"token": "s3cret"})
    start_babysitter(procs, cfg)
    base = f"http://127.0.0.1:{port + 1}"
    pid = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], what="running")
    code, body = http_json("POST", f"{base}/restart")
    assert code == 401 and body["error"]["code"] == "invalid_token"
    auth = {"Authorization": "Bearer s3cret"}
    assert http_json("POST", f"{base}/restart", headers=auth)[0] == 202
    st = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"] != pid and s, what="restarted")
    assert st["restarts"] == 1 and not alive(pid)
    assert http_json("POST", f"{base}/stop", headers=auth)[0] == 202
    st2 = wait_for(lambda: (s := status(port))["state"] == "stopped" and s, what="stopped")
    assert st2["pid"] is None and not alive(st["pid"])
    assert http_get_json(f"{base}/health")[0] == 503
    assert http_json("POST", f"{base}/start", headers=auth)[0] == 202
    wait_for(lambda: status(port)["state"] == "running", what="running again")
    code, text = http_get_json(f"{base}/metrics")
    assert 'infinilm_babysitter_backend_up{name="bs-tok"} 1' in text
    assert 'infinilm_babysitter_restarts_total{name="bs-tok"} 2' in text
    m = metrics(port)
    name = (("name", "bs-tok"),)
    assert m[("infinilm_babysitter_backend_up", name)] == 1 and m[("infinilm_babysitter_restarts_total", name)] == 2
    assert {st: m[("infinilm_babysitter_backend_state", (("name", "bs-tok"), ("state", st)))]
            for st in ("starting", "running", "backoff", "fatal", "stopping", "stopped")} == \
        {"starting": 0, "running": 1, "backoff": 0, "fatal": 0, "stopping": 0, "stopped": 0}
    assert m[("infinilm_babysitter_log_lines", name)] > 0
    assert ("infinilm_babysitter_registered", name) not in m  # no registry_url: no registry metrics
    code, info = http_get_json(f"{base}/info")
    assert info["port"] == port + 1 and info["service_type"] == "mock" and info["restart_count"] == 2


async def test_logs_tail_and_follow_across_a_restart(procs, tmp_path):
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-logs", port, MOCK, policy={"restart_delay": 0.3, "backoff_max": 1})
    start_babysitter(procs, cfg)
    base = f"http://127.0.0.1:{port + 1}"
    await asyncio.to_thread(wait_for, lambda: status(port)["state"] == "running", what="running")
    async with aiohttp.ClientSession() as session:
        tail = await (await session.get(f"{base}/logs?tail=3")).json()
        assert tail["name"] == "bs-logs" and len(tail["lines"]) == 3
        assert {"ts", "stream", "line"} <= set(tail["lines"][0])
        async with session.get(f"{base}/logs?follow=1&tail=1") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            pid = status(port)["pid"]
            os.kill(pid, signal.SIGKILL)
            seen: list[dict] = []

            async def read_until_ready_again():
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))
                        if any("restarting in 0.3 s" in e["line"] for e in seen) and \
                                seen[-1]["line"].startswith("backend ready"):
                            return

            await asyncio.wait_for(read_until_ready_again(), 20)
    text = [(e["stream"], e["line"]) for e in seen]
    assert ("babysitter", "backend exited with code -9 (SIGKILL); restarting in 0.3 s") in text
    assert any(s == "stdout" and ln.startswith("mock bs-logs: serving model-1") for s, ln in text)
    log_file = (tmp_path / "logs" / "bs-logs.log").read_text()
    assert "restarting in 0.3 s" in log_file and "[stdout] mock bs-logs: serving model-1" in log_file


def test_registry_token_is_used_for_register_and_heartbeat(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path, token="reg-s3cret")
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-regtok", port, MOCK, registry=reg, top={"token": "reg-s3cret"})
    start_babysitter(procs, cfg)
    rec = wait_for(lambda: (r := record(reg, "bs-regtok-server")) and r["status"] == "running" and r,
                   what="registered with the token and running")
    assert record(reg, "bs-regtok") is not None
    name = (("name", "bs-regtok"),)
    # Heartbeats reach the registry: the rounds are counted and the record's heartbeat moves on.
    m = wait_for(lambda: (m := metrics(port))[("infinilm_babysitter_heartbeats_total", name)] >= 2 and m,
                 what="heartbeats accepted")
    assert m[("infinilm_babysitter_registered", name)] == 1
    wait_for(lambda: record(reg, "bs-regtok-server")["last_heartbeat"] != rec["last_heartbeat"],
             what="a later heartbeat in the record")
    st = status(port)["registry"]
    assert st["registered"] is True and st["last_error"] is None and st["last_ok"]


def test_wrong_registry_token_keeps_supervising_and_says_why(procs, tmp_path):
    _, reg = start_registry(procs, tmp_path, token="right")
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-badtok", port, MOCK, registry=reg, top={"token": "wrong"})
    bs = start_babysitter(procs, cfg)
    st = wait_for(lambda: (s := status(port))["state"] == "running" and s["registry"]["last_error"] and s,
                  what="running with a registry error")
    assert st["registry"]["registered"] is False and "401" in st["registry"]["last_error"]
    assert "Bearer" in st["registry"]["last_error"]
    assert http_get_json(f"http://127.0.0.1:{port + 1}/health")[0] == 200
    assert record(reg, "bs-badtok") is None and record(reg, "bs-badtok-server") is None
    assert metrics(port)[("infinilm_babysitter_registered", (("name", "bs-badtok"),))] == 0
    wait_for(lambda: "registry trouble (registry answered 401" in procs.output(bs), what="the warning in its log")


INT_TRAP = """\
import http.server, json, signal, sys, os
def on_int(*a):
    open(sys.argv[2], "w").write("got INT")
    os._exit(0)
signal.signal(signal.SIGINT, on_int)
signal.signal(signal.SIGTERM, lambda *a: print("ignoring TERM", flush=True))
print("listening", flush=True)
print("a warning on stderr", file=sys.stderr, flush=True)
""" + SERVE_MODELS


def test_stopsignal_int_is_sent_and_log_lines_carry_their_stream(procs, tmp_path):
    """stopsignal = "INT" reaches the backend (which ignores TERM); /logs tags stdout, stderr and markers."""
    port = free_port(pair=True)
    script, flag = tmp_path / "int_trap.py", tmp_path / "got-int"
    script.write_text(INT_TRAP)
    cfg = write_babysitter(tmp_path, "bs-int", port, {"type": "command", "command": PY,
                                                     "args": [str(script), str(port), str(flag)]},
                           policy={"stopsignal": "INT", "stop_timeout": 30})
    start_babysitter(procs, cfg)
    pid = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], what="running")
    assert http_json("POST", f"http://127.0.0.1:{port + 1}/stop")[0] == 202
    st = wait_for(lambda: (s := status(port))["state"] == "stopped" and s, what="stopped")
    assert flag.read_text() == "got INT"
    assert st["last_exit_code"] == 0 and st["last_exit_reason"] == "stop requested (exited with code 0)"
    assert not alive(pid)
    lines = http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=100")[1]["lines"]
    streams = {(e["stream"], e["line"]) for e in lines}
    assert ("stdout", "listening") in streams and ("stderr", "a warning on stderr") in streams
    assert any(s == "babysitter" and ln.startswith("stopping backend (pid ") for s, ln in streams)
    assert {e["stream"] for e in lines} == {"stdout", "stderr", "babysitter"}
    assert not any("ignoring TERM" in ln or "killing it" in ln for _, ln in streams)
