"""The integration demo end to end: run-local.sh with the built pyz, validate, lose server 2, stop-all.sh."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, bindable, http_get_json, http_json, wait_for

DEMO = ROOT / "demo" / "integration-validation"
DEMO_PORTS = (18000, 8000, 8100, 8101, 8200, 8201, 2379, 2380)

pytestmark = pytest.mark.e2e


def _ports_free(host: str) -> bool:
    return all(bindable(host, port) for port in DEMO_PORTS)


def _two_addresses() -> tuple[str, str]:
    """Loopback addresses of this test's own (not the demo's 127.0.0.2/3), with the demo's ports free."""
    for _ in range(50):
        a, b = random.sample(range(20, 251), 2)
        third = random.randint(1, 250)
        s1, s2 = f"127.{third}.0.{a}", f"127.{third}.0.{b}"
        if _ports_free(s1) and _ports_free(s2):
            return s1, s2
    pytest.fail("no pair of loopback addresses with the demo's ports free")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, starttime) for every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(d.name)] = (int(fields[1]), fields[19])
    return out


def _tree(pid: int) -> set[int]:
    table = _proc_table()
    found, todo = {pid}, [pid]
    while todo:
        cur = todo.pop()
        for p, (ppid, _) in table.items():
            if ppid == cur and p not in found:
                found.add(p)
                todo.append(p)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _processes_using(addresses: tuple[str, ...]) -> list[str]:
    """Command lines of live processes that were given one of `addresses` as an argument."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or not _alive(int(d.name)):
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if any(a in addresses or any(a.startswith(f"http://{ip}:") for ip in addresses) for a in text):
            out.append(f"{d.name}: {' '.join(text)}")
    return out


def _run(script: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEMO / script), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _mock_demo(pyz_path, tmp_path) -> tuple[str, str, Path, dict]:
    """Two free loopback addresses, the run directory and the environment of a demo on mocks."""
    s1, s2 = _two_addresses()
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "INFINILM_PYZ": str(pyz_path), "INFINILM_PYTHON": sys.executable,
           "COLUMNS": "200", "READY_TIMEOUT": "30", "VALIDATE_WAIT": "20"}
    return s1, s2, run_dir, env


def test_run_local_validates_then_losing_server_2_fails_checks_3_and_7_and_stop_all_leaves_nothing(pyz_path, tmp_path):
    s1, s2, run_dir, env = _mock_demo(pyz_path, tmp_path)
    try:
        first = _run("run-local.sh", s1, s2, env=env, timeout=90)
        out = first.stdout
        assert first.returncode == 0, out + first.stderr
        assert "9 passed, 0 failed" in out.splitlines()
        assert f"console --registry http://{s1}:18000" in out
        assert "stop-all.sh" in out
        # The servers are left running, and running it again detects them instead of starting twice.
        pids = {n: int((run_dir / f"{n}.pid").read_text().split()[0]) for n in ("server1", "server2")}
        again = _run("start-server1.sh", s1, env=env, timeout=30)
        assert again.returncode == 0 and f"server1 is already running (pid {pids['server1']}" in again.stdout

        # Server 2 dies hard: the process and its mocks.
        for pid in _tree(pids["server2"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def server2_unhealthy() -> bool:
            _, body = http_get_json(f"http://{s1}:18000/services")
            recs = {r["name"]: r for r in body["services"]}
            return all(not recs.get(n, {}).get("is_healthy") for n in
                       ("babysitter-c", "babysitter-c-server", "babysitter-d", "babysitter-d-server"))

        wait_for(server2_unhealthy, timeout=20, interval=0.2, what="the registry to see server 2 gone")
        second = _run("validate.sh", s1, "--json", env={**env, "VALIDATE_WAIT": "0"}, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        checks = {c["number"]: c for c in json.loads(second.stdout)["checks"]}
        assert not checks[3]["passed"]
        for name in ("babysitter-c", "babysitter-c-server", "babysitter-d", "babysitter-d-server"):
            assert name in checks[3]["detail"]
        assert f"come from 1 host(s) ({s1})" in checks[3]["detail"]
        assert not checks[7]["passed"]
        assert "babysitter-c-server served 0 of 8" in checks[7]["detail"]
        assert "babysitter-d-server served 0 of 8" in checks[7]["detail"]
        # Server 1 alone still answers every request.
        assert checks[1]["passed"] and checks[5]["passed"] and checks[6]["passed"]

        server1_tree = _tree(pids["server1"])
        assert len(server1_tree) >= 3  # the server and its two mocks
        stop = _run("stop-all.sh", env=env, timeout=60)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "server1 stopped" in stop.stdout
        assert [p for p in server1_tree if _alive(p)] == []
        assert _processes_using((s1, s2)) == []
        assert not list(run_dir.glob("*.pid"))
    finally:
        subprocess.run([str(DEMO / "stop-all.sh")], env=env, capture_output=True, timeout=60)
        for line in _processes_using((s1, s2)):  # last resort, so a failed test leaves nothing behind
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


HA = ROOT / "demo" / "ha"


def _three_addresses() -> tuple[str, str, str]:
    """Three loopback addresses of this test's own with the HA demo's ports free (etcd's too)."""
    for _ in range(50):
        third = random.randint(1, 250)
        ips = tuple(f"127.{third}.1.{n}" for n in random.sample(range(20, 251), 3))
        if all(_ports_free(ip) for ip in ips):
            return ips  # type: ignore[return-value]
    pytest.fail("no three loopback addresses with the demo's ports free")


def test_ha_demo_validates_through_any_registry_and_after_losing_a_server(pyz_path, tmp_path):
    """demo/ha: three servers (etcd + registry + router); validate passes through each registry,
    and through server 2's registry after server 1 and its etcd member are killed."""
    from etcd_cluster import etcd_binary

    ips = _three_addresses()
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "INFINILM_PYZ": str(pyz_path), "INFINILM_PYTHON": sys.executable,
           "INFINILM_ETCD": etcd_binary(), "COLUMNS": "200", "READY_TIMEOUT": "60", "VALIDATE_WAIT": "30"}

    def run(script: str, *args: str, extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(HA / script), *args], env={**env, **(extra or {})}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    try:
        first = run("run-local.sh", *ips, timeout=240)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "9 passed, 0 failed" in first.stdout.splitlines()
        assert f"validating the deployment of registry http://{ips[1]}:18000" in first.stdout
        for ip in (ips[0], ips[2]):
            again = run("validate.sh", ip)
            assert again.returncode == 0 and "9 passed, 0 failed" in again.stdout.splitlines(), again.stdout
        # Server 1 dies hard, with its etcd member: the other two registries still validate writes and
        # reads; only server 1's babysitter (a, model-1) is gone, so the placement checks see it.
        for name in ("server1", "etcd1"):
            pid = int((run_dir / f"{name}.pid").read_text().split()[0])
            for p in _tree(pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        code, body = http_get_json(f"http://{ips[1]}:18000/health")
        assert code == 200 and body["store"] == "etcd"
        r = subprocess.run([sys.executable, str(pyz_path), "validate", "--registry",
                            f"http://{ips[0]}:18000,http://{ips[1]}:18000", "--json", "--wait", "0"],
                           capture_output=True, text=True, timeout=120)
        checks = {c["number"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks[1]["passed"], checks[1]
        assert f"http://{ips[1]}:18000" in checks[1]["detail"]
        stop = run("stop-all.sh", timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not list(run_dir.glob("*.pid"))
        assert _processes_using(ips) == []
    finally:
        subprocess.run([str(HA / "stop-all.sh")], env=env, capture_output=True, timeout=120)
        for line in _processes_using(ips):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def _raw(method: str, url: str, body: dict | None = None) -> str:
    """A response body as text, the way upstream's scripts see it through curl."""
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def _chat(s1: str, model: str) -> str:
    return _raw("POST", f"http://{s1}:8000/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "Hello"}], "stream": False})


NAME_FIELD = re.compile(r'"name":"[^"]*"')   # upstream validate.sh: grep -o '"name":"[^"]*"'


def test_upstream_validate_sh_parsing_passes_and_validate_passes_right_after_a_restart(pyz_path, tmp_path):
    """Upstream's validate.sh checks, parsed its way (compact JSON, mock-service-X answers), pass against
    the demo; a backend its babysitter restarted after a crash is routed again at once, so a validate
    run right away passes."""
    s1, s2, run_dir, env = _mock_demo(pyz_path, tmp_path)
    try:
        first = _run("run-local.sh", s1, s2, env=env, timeout=90)
        assert first.returncode == 0, first.stdout + first.stderr
        # 3. service discovery: at least 4 "name" fields in the registry's /services.
        names = NAME_FIELD.findall(_raw("GET", f"http://{s1}:18000/services"))
        assert len(names) >= 8 and '"name":"babysitter-a-server"' in names, names
        # 4. model aggregation: /models names both models.
        models = _raw("GET", f"http://{s1}:8000/models")
        assert '"id":"model-1"' in models and '"id":"model-2"' in models, models
        # 5, 6. chat: the answer names the model and a mock-service.
        for model in ("model-1", "model-2"):
            answer = _chat(s1, model)
            assert model in answer and "mock-service" in answer, answer
        # 7. load balancing: each model-1 answer comes from mock-service-a or -c; both take turns.
        seen = set()
        for _ in range(4):
            m = re.search(r"mock-service-[ac]", _chat(s1, "model-1"))
            assert m, "a model-1 answer names neither mock-service-a nor mock-service-c"
            seen.add(m.group(0))
        assert seen == {"mock-service-a", "mock-service-c"}

        # Backend C crashes while requests come in, and its babysitter restarts it. To let requests
        # reach the dead port before anyone notices, server 2 (babysitters C and D) is paused
        # meanwhile: the router opens C's circuit (10 s in the demo).
        def record(name: str) -> dict:
            return http_get_json(f"http://{s1}:18000/services/{name}")[1]

        def circuit(name: str) -> str:
            _, stats = http_get_json(f"http://{s1}:8000/stats")
            return next(b["circuit"] for b in stats["services"] if b["name"] == name)

        server2 = int((run_dir / "server2.pid").read_text().split()[0])
        old_pid = record("babysitter-c-server")["metadata"]["pid"]
        os.kill(server2, signal.SIGSTOP)
        try:
            os.kill(old_pid, signal.SIGKILL)
            for _ in range(4):
                assert "mock-service-a" in _chat(s1, "model-1")     # C refuses; the router retries on A
            assert circuit("babysitter-c-server") == "open"
        finally:
            os.kill(server2, signal.SIGCONT)

        def restarted() -> bool:
            rec = record("babysitter-c-server")
            return rec["status"] == "running" and rec["metadata"]["pid"] not in (None, old_pid)
        wait_for(restarted, timeout=30, interval=0.1, what="babysitter C to restart its backend")
        # At once, while the old process's cool-down would still run: validate passes (check 7
        # needs C to take its share of model-1), because the new process starts with a closed circuit.
        again = _run("validate.sh", s1, "--json", env=env, timeout=90)
        assert again.stdout.startswith("{"), again.stdout + again.stderr
        checks = json.loads(again.stdout)["checks"]
        assert again.returncode == 0, [c for c in checks if not c["passed"]]
    finally:
        subprocess.run([str(DEMO / "stop-all.sh")], env=env, capture_output=True, timeout=60)
        for line in _processes_using((s1, s2)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


def test_demo_on_real_engines_validates_and_fails_when_one_engine_is_stopped(engine, pyz_path, tmp_path):
    """run-local.sh --engine llama.cpp: four llama-servers; validate finds a real engine's evidence."""
    s1, s2 = _two_addresses()
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "INFINILM_PYZ": str(pyz_path), "INFINILM_PYTHON": sys.executable,
           "INFINILM_ENGINE_DIR": str(engine.server.parent.parent), "COLUMNS": "200", "READY_TIMEOUT": "90",
           "VALIDATE_WAIT": "30"}
    try:
        first = _run("run-local.sh", "--engine", "llama.cpp", s1, s2, env=env, timeout=300)
        out = first.stdout
        assert first.returncode == 0, out + first.stderr
        assert "9 passed, 0 failed" in out.splitlines()
        engines = [p for p in _tree(int((run_dir / "server2.pid").read_text().split()[0]))
                   if Path(f"/proc/{p}/exe").resolve().name == "llama-server"]
        assert len(engines) == 2, "server 2 runs two llama-servers"
        result = _run("validate.sh", s1, "--json", env=env, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        checks = {c["number"]: c for c in json.loads(result.stdout)["checks"]}
        # No mock names itself here: requests are traced by the engines' own counters.
        assert "matched by the engines' own generated-token counters" in checks[8]["detail"]
        assert "request ids each found" not in checks[8]["detail"]

        # One engine stopped through its babysitter: validate must fail.
        status, _ = http_json("POST", f"http://{s2}:8201/stop")
        assert status == 202
        wait_for(lambda: not {r["name"]: r for r in http_get_json(f"http://{s1}:18000/services")[1]["services"]}
                 ["babysitter-d-server"]["is_healthy"], timeout=20, what="the registry to see the engine stopped")
        second = _run("validate.sh", s1, "--json", env={**env, "VALIDATE_WAIT": "0"}, timeout=120)
        assert second.returncode == 1, second.stdout + second.stderr
        checks = {c["number"]: c for c in json.loads(second.stdout)["checks"]}
        assert not checks[3]["passed"] and "babysitter-d-server" in checks[3]["detail"]
        assert not checks[7]["passed"] and "model-2" in checks[7]["detail"]
        assert checks[5]["passed"] and checks[6]["passed"] and checks[8]["passed"]
    finally:
        subprocess.run([str(DEMO / "stop-all.sh")], env=env, capture_output=True, timeout=60)
        for line in _processes_using((s1, s2)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
