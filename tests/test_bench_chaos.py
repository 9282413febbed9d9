"""bench/chaos.py runs to completion, prints a well-formed table, and leaves no process behind, also
when it is interrupted. (Its numbers are not checked: benchmarks measure, tests do not time.)"""
from __future__ import annotations

import os
import re
import signal
import sys
import uuid
from pathlib import Path

import pytest

from harness import ROOT, wait_for

BENCH = ROOT / "bench" / "chaos.py"
ROW = re.compile(r"^(?P<fault>.+?)\s{2,}(?P<sent>\d+)\s+(?P<failed>\d+)\s+(?P<slowest>[\d.]+|-)\s+"
                 r"(?P<detected>[\d.]+|-)\s+(?P<recovered>[\d.]+|-)(\s{2}(?P<notes>.*))?$")


def marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries the mark (the bench and all it started)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"CHAOS_TEST_MARK={mark}".encode() in env.split(b"\0") and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry), cmd))
    return found


@pytest.fixture
def mark():
    """A mark in the environment of the bench, inherited by everything it starts; anything still
    marked after the test is killed, so a failing test leaves nothing behind either."""
    value = uuid.uuid4().hex
    yield value
    for pid, _ in marked(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_chaos_bench_runs_two_faults_prints_the_table_and_stops_everything(procs, tmp_path, pyz_path, mark):
    bench = procs.start([sys.executable, str(BENCH), "--duration-per-fault", "2", "--backends", "2",
                         "--faults", "backend-kill,solo-loss", "--rate", "20"],
                        name="chaos", env={"CHAOS_TEST_MARK": mark}, cwd=ROOT)
    assert bench.wait(timeout=120) == 0, procs.output(bench)
    out = procs.output(bench)
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("fault "))
    assert lines[head].split() == ["fault", "sent", "failed", "slowest", "(s)", "detected", "(s)", "recovered",
                                   "(s)", "notes"]
    rows = [ROW.match(ln) for ln in lines[head + 1:head + 4]]
    assert all(rows), lines[head:head + 4]
    assert [r["fault"].strip() for r in rows[:2]] == ["backend kill -9", "only backend of chaos-solo kill -9"]
    assert rows[2]["fault"].startswith("total")
    assert all(int(r["sent"]) > 0 and int(r["failed"]) <= int(r["sent"]) for r in rows)
    assert all(r["recovered"] != "-" for r in rows[:2]), out   # both faults recovered
    assert int(rows[2]["sent"]) >= max(int(r["sent"]) for r in rows[:2])
    assert "backend-kill: the router routes to" in out and "solo-loss: the router routes to" in out
    assert re.search(r"chaos: stopped \d+ processes it started; none needed SIGKILL", out), out[-500:]
    assert marked(mark) == []


def test_chaos_bench_interrupted_stops_everything_it_started(procs, tmp_path, pyz_path, mark):
    bench = procs.start([sys.executable, str(BENCH), "--backends", "1", "--faults", "hang", "--hang-seconds", "60"],
                        name="chaos", env={"CHAOS_TEST_MARK": mark}, cwd=ROOT)
    # The deployment is up: the registry, the router, two babysitters and their two mock backends.
    wait_for(lambda: sum(" mock " in cmd for _, cmd in marked(mark)) == 2 and len(marked(mark)) >= 7,
             timeout=60, what="the bench's deployment running")
    bench.send_signal(signal.SIGINT)
    assert bench.wait(timeout=60) == 130, procs.output(bench)
    assert "chaos: interrupted; stopping everything it started" in procs.output(bench)
    assert marked(mark) == []
