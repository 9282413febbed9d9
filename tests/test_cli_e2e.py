"""The built pyz as a user runs it: the registry from a TOML file, check-config, exit codes, signals."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from harness import PYZ, free_port, http_get_json, http_json, wait_for

pytestmark = pytest.mark.e2e


def run_pyz(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PYZ), *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help(pyz_path):
    out = run_pyz("--version")
    assert out.returncode == 0 and out.stdout.startswith("infinilm-svc ")
    out = run_pyz("--help")
    assert out.returncode == 0 and "--config" in out.stdout


def test_check_config_prints_all_three_mistakes_with_lines_and_exits_2(pyz_path, tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[registry]\nport = 70000\nheartbeat_tll = 10\nbind = "127.0.0.1"\n[router]\n'
                   'registry_url = "http://127.0.0.1:18000"\npolicy = "fastest"\n')
    out = run_pyz("check-config", str(cfg))
    assert out.returncode == 2
    lines = [line for line in out.stdout.splitlines() if line.startswith(str(cfg))]
    assert len(lines) == 3, out.stdout
    assert any(":2: registry.port:" in line for line in lines)
    assert any(":3: registry.heartbeat_tll: unknown key" in line for line in lines)
    assert any(":7: router.policy: unknown policy 'fastest'" in line for line in lines)
    assert "3 problem(s) found" in out.stdout


def test_a_registry_on_every_interface_without_a_token_refuses_to_start(pyz_path, tmp_path):
    """Secure by default: no open registry on a network unless the operator says insecure = true."""
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[registry]\nport = {port}\n')
    out = run_pyz("--config", str(cfg))
    assert out.returncode == 2 and "registry.bind: the registry would listen on 0.0.0.0 with no token" in out.stderr
    cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\n')
    out = run_pyz("--config", str(cfg), "--bind", "0.0.0.0")
    assert out.returncode == 2 and "--bind: the registry would listen on 0.0.0.0" in out.stderr
    cfg.write_text(f'[registry]\nport = {port}\ninsecure = true\n')
    assert run_pyz("check-config", str(cfg)).returncode == 0
    cfg.write_text(f'[registry]\nport = {port}\ntoken = "t"\n')
    assert run_pyz("check-config", str(cfg)).returncode == 0


def test_check_config_accepts_a_good_file(pyz_path, tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[registry]\nbind = "127.0.0.1"\nport = 18000\n')
    out = run_pyz("check-config", str(cfg))
    assert out.returncode == 0 and "registry on 127.0.0.1:18000" in out.stdout


def test_bad_config_exits_2_before_opening_any_socket(pyz_path, tmp_path):
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\nbogus = 1\n')
    out = run_pyz("--config", str(cfg))
    assert out.returncode == 2 and "bogus: unknown key" in out.stderr


def test_unknown_command_and_no_config_are_usage_errors(pyz_path):
    assert run_pyz("frobnicate").returncode == 2
    assert run_pyz().returncode == 2


def test_registry_from_the_pyz_serves_plain_http_and_stops_on_sigterm(procs, pyz_path, tmp_path):
    port = free_port()
    cfg = tmp_path / "registry.toml"
    cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\nheartbeat_ttl = 1\nexpire_after = 2\n'
                   f'sweep_interval = 0.1\nstate_file = "{tmp_path / "state.json"}"\n')
    proc = procs.pyz("--config", str(cfg), name="registry")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_get_json(base + "/health")[0] == 200, timeout=30, what="registry /health")
    status, body = http_json("POST", base + "/services",
                             {"name": "x-server", "host": "0.0.0.0", "port": 8100, "metadata": {"type": "openai-api"}})
    assert status == 201 and body["service"]["host"] == "127.0.0.1"
    status, body = http_get_json(base + "/services?healthy=true")
    assert [s["name"] for s in body["services"]] == ["x-server"]
    # Without heartbeats the record lapses, then expires.
    wait_for(lambda: http_get_json(base + "/services/x-server")[0] == 404, timeout=10, what="expiry")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "shutting down" in procs.output(proc)
    assert (tmp_path / "state.json").exists()


def test_a_taken_port_is_reported_and_exits_1(procs, pyz_path, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "registry.toml"
        cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\n')
        out = run_pyz("--config", str(cfg))
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_json_log_format_writes_one_object_per_line(procs, pyz_path, tmp_path):
    import json

    port = free_port()
    cfg = tmp_path / "registry.toml"
    cfg.write_text(f'[registry]\nbind = "127.0.0.1"\nport = {port}\n')
    proc = procs.pyz("--config", str(cfg), "--log-format", "json", name="registry")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=30, what="registry up")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    records = [json.loads(line) for line in procs.output(proc).splitlines() if line.strip()]
    assert any(r["msg"].startswith("registry registry listening on") and r["level"] == "info" for r in records)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


STUBBORN_BACKEND = r'''
import http.server, json, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # only KILL stops it
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_a_second_signal_forces_the_exit_and_kills_the_backend_group(procs, pyz_path, tmp_path):
    """The first SIGTERM waits for a backend that ignores TERM; a second one exits at once, no orphan."""
    import os

    port = free_port(pair=True)
    (tmp_path / "stubborn.py").write_text(STUBBORN_BACKEND)
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'name = "stubborn"\nhost = "127.0.0.1"\nbind = "127.0.0.1"\nport = {port}\n'
                   f'[babysitter]\nstop_timeout = 120\nlog_dir = "{tmp_path}"\n'
                   f'[backend]\ntype = "command"\ncommand = "{sys.executable}"\n'
                   f'args = ["{tmp_path / "stubborn.py"}", "{port}"]\n')
    proc = procs.pyz("--config", str(cfg), name="babysitter")
    base = f"http://127.0.0.1:{port + 1}"
    wait_for(lambda: http_get_json(base + "/health")[0] == 200, timeout=30, what="backend running")
    child = http_get_json(base + "/status")[1]["pid"]
    try:
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping backend" in procs.output(proc), timeout=10, what="babysitter stopping the backend")
        assert proc.poll() is None, "the first signal must wait for the backend (stop_timeout = 120 s)"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 1
        assert "second signal: forcing exit" in procs.output(proc)

        def child_gone():
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # Killed but not yet reaped by init counts as gone.
            return open(f"/proc/{child}/stat").read().split(")")[1].split()[0] == "Z"

        wait_for(child_gone, timeout=10, what=f"backend pid {child} killed")
    finally:
        try:  # the backend is in its own session: the procs fixture cannot reach it if this failed
            if b"stubborn.py" in open(f"/proc/{child}/cmdline", "rb").read():
                os.kill(child, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
