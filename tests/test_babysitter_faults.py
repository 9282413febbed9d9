"""Babysitter faults with real processes, at the default timings: hangs seen in seconds, no orphans."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

from harness import free_port, http_get_json, wait_for
from test_babysitter import MOCK, alive, record, start_babysitter, start_registry, status, write_babysitter

# The default liveness timings; only what does not decide how fast a hang is seen is shortened.
DEFAULTS = {"restart_delay": 0.1, "backoff_max": 0.5}


def _log_lines(port: int) -> list[dict]:
    return http_get_json(f"http://127.0.0.1:{port + 1}/logs?tail=1000")[1]["lines"]


def test_backend_that_hangs_is_not_running_in_the_registry_within_seconds_then_restarted(procs, tmp_path):
    """--hang-after: the backend accepts and never answers; the registry says so within about 3 s."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    # Readiness takes one request and liveness one a second: it hangs about 3 s after it is ready.
    cfg = write_babysitter(tmp_path, "bs-hang3", port, {**MOCK, "mock_options": ["--hang-after", "4"]},
                           registry=reg, base=DEFAULTS)
    start_babysitter(procs, cfg)
    first = wait_for(lambda: (r := record(reg, "bs-hang3-server")) and r["status"] == "running" and r,
                     what="backend running")["metadata"]["pid"]
    down = wait_for(lambda: (r := record(reg, "bs-hang3-server")) and r["status"] != "running" and r,
                    timeout=10, what="the registry to show the hung backend not running")
    seen = time.time()
    assert down["status"] == "unresponsive" and down["is_healthy"] is False
    hung = next(e["ts"] for e in _log_lines(port) if "hanging after 4 requests" in e["line"])
    print(f"hung backend not running in the registry {seen - hung:.2f} s after it hung")
    st = wait_for(lambda: (s := status(port))["restarts"] >= 1 and s["state"] == "running" and s, timeout=20,
                  what="a restart after the hang")
    assert st["pid"] != first and not alive(first)
    assert "not answering: 3 liveness probes failed" in st["last_exit_reason"]


def test_stopped_backend_is_not_running_within_seconds_and_is_restarted_without_waiting_stop_timeout(procs, tmp_path):
    """SIGSTOP: the registry shows it not running within about 3 s; TERM reaches it (SIGCONT) at once."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-stop", port, MOCK, registry=reg, base={**DEFAULTS, "stop_timeout": 60})
    start_babysitter(procs, cfg)
    pid = wait_for(lambda: (r := record(reg, "bs-stop-server")) and r["status"] == "running" and r,
                   what="backend running")["metadata"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: (r := record(reg, "bs-stop-server")) and r["status"] != "running" and r,
                 timeout=10, what="the registry to show the stopped backend not running")
        print(f"SIGSTOPped backend not running in the registry {time.monotonic() - stopped:.2f} s after the stop")
        # stop_timeout is 60 s: a restart well before that means TERM was delivered, not KILL after waiting.
        st = wait_for(lambda: (s := status(port))["restarts"] >= 1 and s["state"] == "running" and s, timeout=30,
                      what="a restart of the stopped backend")
        print(f"restarted {time.monotonic() - stopped:.2f} s after the stop")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "not answering" in st["last_exit_reason"] and not alive(pid)
    lines = [e["line"] for e in _log_lines(port)]
    assert not any("did not stop within" in ln for ln in lines)


def test_backend_that_answers_again_is_running_again(procs, tmp_path):
    """A backend that misses one probe (SIGSTOP, then SIGCONT) is unresponsive, then running, not restarted."""
    _, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-pause", port, MOCK, registry=reg, base={**DEFAULTS, "liveness_failures": 100})
    start_babysitter(procs, cfg)
    pid = wait_for(lambda: (r := record(reg, "bs-pause-server")) and r["status"] == "running" and r,
                   what="backend running")["metadata"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: (r := record(reg, "bs-pause-server")) and r["status"] == "unresponsive",
                 timeout=10, what="unresponsive")
    finally:
        os.kill(pid, signal.SIGCONT)
    back = wait_for(lambda: (r := record(reg, "bs-pause-server")) and r["status"] == "running" and r,
                    what="running again")
    assert back["metadata"]["pid"] == pid and status(port)["restarts"] == 0
    assert any("answers again" in e["line"] for e in _log_lines(port))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_kill9_of_the_babysitter_takes_its_backend_with_it(procs, tmp_path, pyz_path):
    """The pyz babysitter is killed with SIGKILL: its mock backend (the pyz re-run) dies too."""
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-orphan", port, MOCK)
    bs = procs.pyz("--config", str(cfg), name="babysitter")
    pid = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], timeout=20, what="running")
    try:
        os.kill(bs.pid, signal.SIGKILL)
        bs.wait(timeout=10)
        wait_for(lambda: not alive(pid), timeout=10, what=f"backend pid {pid} to die with its babysitter")
    finally:
        _kill_group(pid)


# A backend whose server is a grandchild: parent-death reaches only the shell, the server lingers.
GRANDCHILD = "{py} -m infinilm_svc mock --name bs-left --port {port} --models model-1 --host 127.0.0.1 & wait"


def test_a_restarted_babysitter_ends_the_backend_its_killed_predecessor_left(procs, tmp_path):
    """The pid file beside the log names the old backend's group; the new babysitter ends it, then starts."""
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-left", port,
                           {"type": "command", "command": "sh", "args": ["-c", GRANDCHILD.format(py=sys.executable, port=port)]})
    bs = start_babysitter(procs, cfg)
    leader = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"], timeout=20, what="running")
    pid_file = tmp_path / "logs" / "bs-left.pid"
    assert pid_file.exists()
    os.kill(bs.pid, signal.SIGKILL)
    bs.wait(timeout=10)
    try:
        server = wait_for(lambda: [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                                   if p != leader and alive(p) and os.getpgid(p) == leader],
                          what="the grandchild server left behind")[0]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it still holds the port
        start_babysitter(procs, cfg)
        st = wait_for(lambda: (s := status(port))["state"] == "running" and s["pid"] != leader and s, timeout=20,
                      what="the new babysitter's backend running")
        assert not alive(server)
        lines = [e["line"] for e in _log_lines(port)]
        assert any("ended the backend a previous babysitter left running" in ln and f"pid {server}" in ln
                   for ln in lines), lines[-20:]
        assert st["restarts"] == 0
    finally:
        _kill_group(leader)


def test_a_port_held_by_someone_else_is_named_not_retried_blindly(procs, tmp_path):
    """Another process listens on the backend's port: /status and the log name its pid and command line."""
    port = free_port(pair=True)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        cfg = write_babysitter(tmp_path, "bs-held", port, MOCK)
        start_babysitter(procs, cfg)
        st = wait_for(lambda: (s := status(port))["last_exit_reason"] and s, what="a failed start")
        assert f"port {port} is held by pid {os.getpid()}" in st["last_exit_reason"]
        # Named by its command line: this test process's (pytest's, or an xdist worker's).
        argv = Path("/proc/self/cmdline").read_bytes().decode().split("\0")
        assert f"({argv[0]} {argv[1]} " in st["last_exit_reason"], st["last_exit_reason"]
        assert st["state"] != "running"
    finally:
        squatter.close()
    wait_for(lambda: status(port)["state"] == "running", timeout=20, what="running once the port is free")


def test_a_restarted_registry_gets_both_records_back_at_once_not_at_the_next_heartbeat(procs, tmp_path):
    """heartbeat_interval 30 s: the parked /epoch watch sees the registry go and a new epoch come."""
    reg_proc, reg = start_registry(procs, tmp_path)
    port = free_port(pair=True)
    cfg = write_babysitter(tmp_path, "bs-epoch", port, MOCK, registry=reg, policy={"heartbeat_interval": 30})
    start_babysitter(procs, cfg)
    wait_for(lambda: (r := record(reg, "bs-epoch-server")) and r["status"] == "running", what="registered")
    old = http_get_json(f"http://127.0.0.1:{reg}/health")[1]["epoch"]
    reg_proc.send_signal(signal.SIGTERM)
    reg_proc.wait(timeout=10)
    start_registry(procs, tmp_path, reg)
    restarted = time.monotonic()
    assert http_get_json(f"http://127.0.0.1:{reg}/health")[1]["epoch"] != old
    wait_for(lambda: record(reg, "bs-epoch") and (r := record(reg, "bs-epoch-server")) and r["status"] == "running",
             timeout=10, what="both records back well before the next heartbeat (30 s)")
    print(f"records back {time.monotonic() - restarted:.2f} s after the new registry answered (heartbeat 30 s)")
