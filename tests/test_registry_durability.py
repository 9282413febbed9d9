"""A 2xx from a registry with a state file means the change is on disk: kill -9 and a full disk lose nothing acknowledged."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from harness import free_port, http_get_json, http_json, wait_for, write_toml
from infinilm_svc.config import RegistryConfig
from infinilm_svc.registry.app import create_app
from test_registry_state import saved_names

PY = sys.executable


def start_registry(procs, tmp_path: Path, state: Path, port: int | None = None):
    port = port or free_port()
    cfg = write_toml(tmp_path / f"registry-{port}.toml", {"registry": {
        "bind": "127.0.0.1", "port": port, "probe_interval": 0, "state_file": str(state)}})
    proc = procs.start([PY, "-m", "infinilm_svc", "--config", str(cfg)], name="registry")
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/health")[0] == 200, what="registry up")
    return proc, port


def service(name: str, pad: int = 0) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": 9000, "metadata": {"type": "openai-api", "pad": "x" * pad}}


async def test_sigkill_during_a_registration_burst_loses_no_acknowledged_registration(procs, tmp_path):
    state = tmp_path / "registry.db"
    proc, port = start_registry(procs, tmp_path, state)
    url = f"http://127.0.0.1:{port}/services"
    acked: list[str] = []
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while not stop.is_set():
            name = f"svc-{w}-{i}"
            i += 1
            try:
                async with session.post(url, json=service(name)) as resp:
                    if resp.status == 201:
                        acked.append(name)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the registry is gone

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        workers = [asyncio.create_task(worker(session, w)) for w in range(32)]
        await asyncio.to_thread(wait_for, lambda: len(acked) >= 400, 30, 0.01, "400 acknowledged registrations")
        proc.send_signal(signal.SIGKILL)   # in the middle of the burst
        proc.wait(timeout=10)
        stop.set()
        await asyncio.gather(*workers)
    start_registry(procs, tmp_path, state, port)
    code, body = http_get_json(f"{url}?")
    restored = {s["name"] for s in body["services"]}
    lost = sorted(set(acked) - restored)
    print(f"{len(acked)} acknowledged before SIGKILL, {len(restored)} restored, {len(lost)} lost")
    assert code == 200 and not lost, lost[:20]


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root and mount permission): {exc} {detail.decode(errors='replace')}")


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_answers_503_and_degraded_never_an_unsaved_201(procs, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    proc = None
    try:
        state = disk / "registry.db"
        proc, port = start_registry(procs, tmp_path, state)
        base = f"http://127.0.0.1:{port}"
        assert http_json("POST", f"{base}/services", service("before"))[0] == 201
        filler = _fill(disk)
        acked, refused, answer = [], [], None
        for i in range(300):
            code, body = http_json("POST", f"{base}/services", service(f"full-{i}", pad=8192))
            assert code in (201, 503), body
            if code == 201:
                acked.append(f"full-{i}")
            else:
                refused.append(f"full-{i}")
                answer = body
                if len(refused) >= 3:
                    break
        print(f"on the full disk: {len(acked)} acknowledged (saved in space the file already had), {len(refused)} refused")
        assert refused, "a full disk never refused a registration"
        assert answer["error"]["code"] == "state_not_saved"
        code, health = http_get_json(f"{base}/health")
        assert code == 200 and health["status"] == "degraded" and health["state_file"]["error"]
        on_disk = saved_names(state)
        assert set(acked) | {"before"} <= on_disk          # every 201 is in the file
        filler.unlink()                                    # room again: what was refused is saved now
        wait_for(lambda: http_get_json(f"{base}/health")[1]["status"] == "healthy", what="healthy again")
        assert set(refused) <= saved_names(state)
        assert http_json("POST", f"{base}/services", service("after"))[0] == 201
        assert "after" in saved_names(state)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


async def test_leftover_temporary_files_are_removed_at_start(aiohttp_client, tmp_path):
    state = tmp_path / "registry.db"
    left = tmp_path / "registry.db.x1y2z3.tmp"   # what a writer killed mid-write of the older format left
    left.write_text('{"version": 1, "serv')
    c = await aiohttp_client(create_app(RegistryConfig(state_file=str(state), probe_interval=0)))
    assert (await c.get("/health")).status == 200
    assert not left.exists()
    assert (await c.post("/services", json=service("a"))).status == 201
    assert saved_names(state) == {"a"}


def test_a_registry_shutting_down_answers_its_parked_watches_at_once(procs, tmp_path):
    """SIGTERM: a watch parked for 60 s is answered (200) at once and the registry exits without waiting for it."""
    proc, port = start_registry(procs, tmp_path, tmp_path / "r.db")
    index = http_get_json(f"http://127.0.0.1:{port}/health")[1]["index"]
    answer: list = []
    t = threading.Thread(target=lambda: answer.append(
        http_get_json(f"http://127.0.0.1:{port}/services?index={index}&wait=60s", timeout=70)))
    t.start()
    wait_for(lambda: http_get_json(f"http://127.0.0.1:{port}/stats")[1]["watchers"] == 1, what="the watch parked")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=3)
    took = time.monotonic() - sent
    assert answer and answer[0][0] == 200, f"the parked watch was not answered within 3 s (registry still running: {proc.poll() is None})"
    assert proc.wait(timeout=3) == 0
    print(f"parked watch answered {took:.2f} s after SIGTERM")


def test_every_answer_carries_the_epoch_which_a_state_file_keeps_across_restarts(procs, tmp_path):
    state = tmp_path / "r.db"
    proc, port = start_registry(procs, tmp_path, state)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/services") as resp:
        epoch = resp.headers["X-Registry-Epoch"]
    assert epoch and http_get_json(f"http://127.0.0.1:{port}/health")[1]["epoch"] == epoch
    assert http_get_json(f"http://127.0.0.1:{port}/epoch")[1] == {"epoch": epoch, "closing": False}
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    start_registry(procs, tmp_path, state, port)   # the same table: the same epoch
    assert http_get_json(f"http://127.0.0.1:{port}/health")[1]["epoch"] == epoch
