"""The babysitter from the built pyz: an upstream-format config with type = "command", and type = "mock"."""
from __future__ import annotations

import os
import signal
import sys

import pytest

from harness import ROOT, free_port, http_get_json, http_json, wait_for, write_toml

pytestmark = pytest.mark.e2e


def _registry(procs, tmp_path) -> int:
    port = free_port()
    cfg = write_toml(tmp_path / "registry.toml", {"registry": {
        "bind": "127.0.0.1", "port": port, "sweep_interval": 0.1, "probe_interval": 0}})
    procs.pyz("--config", str(cfg), name="registry")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="registry up")
    return port


def _record(reg: int, name: str):
    code, body = http_get_json(f"http://127.0.0.1:{reg}/services/{name}")
    return body if code == 200 else None


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return False
    except ProcessLookupError:
        return True


def _exercise(procs, reg: int, name: str, port: int, cfg, served_by: str) -> None:
    """Serve, survive kill -9, then SIGTERM: records gone, no child left."""
    bs = procs.pyz("--config", str(cfg), "--bind", "127.0.0.1", name=name)
    rec = wait_for(lambda: (r := _record(reg, f"{name}-server")) and r["status"] == "running" and r,
                   timeout=20, what=f"{name}-server running")
    assert rec["port"] == port and rec["metadata"]["models"] == ["model-1"]
    assert _record(reg, name)["port"] == port + 1
    code, body = http_json("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                           {"model": "model-1", "messages": [{"role": "user", "content": "hi"}]},
                           headers={"X-Request-ID": f"e2e-{name}"})
    assert code == 200 and body["choices"][0]["message"]["content"] == f"Hello from {served_by} (model: model-1)"
    pid = rec["metadata"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (r := _record(reg, f"{name}-server")) and r["status"] != "running", what="down in the registry")
    rec = wait_for(lambda: (r := _record(reg, f"{name}-server")) and r["status"] == "running" and r,
                   timeout=20, what="running again")
    assert rec["metadata"]["restarts"] == 1
    lines = [e["line"] for e in http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=200")[1]["lines"]]
    assert any(f"id=e2e-{name} " in ln and "model=model-1" in ln for ln in lines)
    child = rec["metadata"]["pid"]
    bs.send_signal(signal.SIGTERM)
    assert bs.wait(timeout=20) == 0
    assert _record(reg, name) is None and _record(reg, f"{name}-server") is None
    assert _gone(child)


def _write_config(tmp_path, name: str, port: int, reg: int, policy: str, backend: str, top: str = ""):
    """A babysitter file in the upstream format: name, host, port, registry_url, then the given tables."""
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'name = "{name}"\nhost = "127.0.0.1"\nport = {port}\nregistry_url = "http://127.0.0.1:{reg}"\n'
                   f'{top}\n[babysitter]\n{policy}\n[backend]\n{backend}')
    return cfg


def test_upstream_config_with_command_running_the_pyz_mock(procs, pyz_path, tmp_path):
    reg = _registry(procs, tmp_path)
    port = free_port(pair=True)
    # Only keys of upstream's babysitter file; --bind on the command line keeps it on loopback.
    cfg = _write_config(tmp_path, "babysitter-a", port, reg, top='router_url = "http://127.0.0.1:8000"\n',
                        policy="max_restarts = 10000\nrestart_delay = 0.1\nheartbeat_interval = 0.3\n",
                        backend=f'''type = "command"
command = "{sys.executable} ./infinilm-svc.pyz mock"
args = ["--name", "mock-service-a", "--port", "{port}", "--models", "model-1", "--host", "127.0.0.1"]
work_dir = "{ROOT}"

[backend.env]
PYTHONDONTWRITEBYTECODE = "1"
''')
    _exercise(procs, reg, "babysitter-a", port, cfg, "mock-service-a")


def test_type_mock_runs_the_pyz_itself(procs, pyz_path, tmp_path):
    reg = _registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = _write_config(tmp_path, "babysitter-m", port, reg, policy="restart_delay = 0.1\nheartbeat_interval = 0.3\n",
                        backend='type = "mock"\nmodels = ["model-1"]\n')
    _exercise(procs, reg, "babysitter-m", port, cfg, "babysitter-m")
    started = [ln for ln in (tmp_path / "logs" / "babysitter-m.log").read_text().splitlines() if "backend started" in ln]
    assert started and str(pyz_path) in started[0]
