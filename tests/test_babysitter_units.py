"""Babysitter pieces without processes: backend command lines and the rotating, followable log."""
from __future__ import annotations

import os
import sys

from infinilm_svc.babysitter.logbook import LogBook, LogFile
from infinilm_svc.babysitter.process import launch_spec, probe_host
from infinilm_svc.babysitter.supervisor import describe_exit, parse_models
from infinilm_svc.config.babysitter import BabysitterConfig, BackendConfig


def cfg(backend: BackendConfig, **kw) -> BabysitterConfig:
    """A config as if read from /etc/bs/bs.toml."""
    return BabysitterConfig(port=8100, backend=backend, name="bs", **kw).with_paths_from("/etc/bs")


def test_command_is_split_like_a_shell_and_args_are_never_resplit():
    spec = launch_spec(cfg(BackendConfig(type="command", command='"/opt/my python/bin/python" -u server.py',
                                         args=("--prompt", "two words"), work_dir="run", env={"A": "1"})))
    assert spec.argv == ("/opt/my python/bin/python", "-u", "server.py", "--prompt", "two words")
    assert spec.cwd == "/etc/bs/run" and spec.env["A"] == "1" and spec.env.get("PATH") == os.environ.get("PATH")


def test_upstream_backend_types_build_their_command_lines():
    vllm = launch_spec(cfg(BackendConfig(type="vllm", model="/m/q", args=("--tp", "2")), bind="127.0.0.3"))
    assert vllm.argv == ("python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/q",
                         "--port", "8100", "--host", "127.0.0.3", "--tp", "2")
    rust = launch_spec(cfg(BackendConfig(type="infinilm-rust", config_file="svc.toml")))
    assert rust.argv == ("xtask", "service", "svc.toml", "-p", "8100")
    inf = launch_spec(cfg(BackendConfig(type="infinilm", model_path="/m")))
    assert inf.argv == ("python3", "launch_server.py", "--port", "8100", "--host", "0.0.0.0")
    assert inf.cwd is None


def test_mock_type_reruns_this_program_on_the_bind_address():
    spec = launch_spec(cfg(BackendConfig(type="mock", models=("a", "b"), mock_options=("--latency", "0.1")),
                           bind="127.0.0.2"))
    assert spec.argv[0] == sys.executable
    assert spec.argv[-11:] == ("mock", "--name", "bs", "--port", "8100", "--models", "a,b", "--host", "127.0.0.2",
                               "--latency", "0.1")
    assert probe_host(cfg(BackendConfig(type="mock", models=("a",)), bind="127.0.0.2")) == "127.0.0.2"
    assert probe_host(cfg(BackendConfig(type="mock", models=("a",)))) == "127.0.0.1"


def test_model_lists_and_exit_descriptions():
    assert [m["id"] for m in parse_models({"data": [{"id": "x"}, {"no": 1}]})] == ["x"]
    assert [m["id"] for m in parse_models([{"id": "y"}, "z"])] == ["y", "z"]
    assert parse_models({"data": []}) == [] and parse_models("nope") == []
    assert describe_exit(-9) == "exited with code -9 (SIGKILL)" and describe_exit(3) == "exited with code 3"


def test_log_file_rotates_at_its_size_cap(tmp_path):
    book = LogBook("bs", ring_lines=100, file=LogFile(str(tmp_path / "logs" / "b.log"), max_bytes=100, backups=2))
    for i in range(30):
        book.add("stdout", f"line {i:02d} xxxxxxxxxx")
    book.close()
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["b.log", "b.log.1", "b.log.2"]
    assert all(p.stat().st_size <= 100 for p in logs.iterdir())
    assert (logs / "b.log").read_text().endswith("[stdout] line 29 xxxxxxxxxx\n")
    assert "[stdout] line 27 xxxxxxxxxx\n" in (logs / "b.log.1").read_text()


def test_without_backups_a_full_log_file_starts_afresh(tmp_path):
    """log_backups = 0: no .1 file, and the file stays under its cap instead of growing."""
    book = LogBook("bs", ring_lines=100, file=LogFile(str(tmp_path / "b.log"), max_bytes=100, backups=0))
    for i in range(30):
        book.add_lines("stdout", [f"line {i:02d} xxxxxxxxxx"])
    book.close()
    assert [p.name for p in tmp_path.iterdir()] == ["b.log"]
    text = (tmp_path / "b.log").read_text()
    assert len(text) <= 100 and text.endswith("[stdout] line 29 xxxxxxxxxx\n")


def test_a_log_file_that_cannot_be_written_leaves_the_in_memory_log(caplog):
    """A full disk (/dev/full) ends the file, once, with a warning; lines still reach the ring."""
    book = LogBook("bs", ring_lines=100, file=LogFile("/dev/full", max_bytes=1000, backups=1))
    book.add_lines("stdout", ["first"])
    book.add_lines("stdout", ["second"])
    assert book.file is None and [e.line for e in book.tail(2)] == ["first", "second"]
    warnings = [r.getMessage() for r in caplog.records if "cannot write the log file" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    book.close()


async def test_ring_keeps_the_last_lines_and_followers_get_new_ones():
    book = LogBook("bs", ring_lines=10)
    for i in range(15):
        book.add("stdout", f"l{i}")
    assert [e.line for e in book.tail(3)] == ["l12", "l13", "l14"]
    assert len(book.tail(100)) == 10
    tail, q = book.follow(2)
    assert [e.line for e in tail] == ["l13", "l14"]
    book.marker("backend exited with code -9; restarting in 5 s")
    e = q.get_nowait()
    assert (e.stream, e.line) == ("babysitter", "backend exited with code -9; restarting in 5 s")
    book.close_followers()
    assert q.get_nowait() is None


def test_an_empty_token_is_a_config_error():
    """`token = ""` would leave POST /restart open: it is refused, like the registry's."""
    problems = cfg(BackendConfig(type="mock", models=("a",)), token=" ").check()
    assert problems == [("token", "token must not be empty (leave it out to disable auth)")]
    assert cfg(BackendConfig(type="mock", models=("a",)), token="t").check() == []


def test_health_path_without_declared_models_is_a_config_error():
    """health_path alone would be ignored (readiness needs models to register): it is refused."""
    problems = BackendConfig(type="command", command="srv", health_path="/ping").check()
    assert problems == [("health_path", 'health_path is for a backend without a model list: it needs models = ["..."]')]
    assert BackendConfig(type="command", command="srv", health_path="/ping", models=("m",)).check() == []


def test_log_lines_are_cut_and_marked_and_the_ring_is_bounded_in_bytes():
    from infinilm_svc.babysitter.logbook import CUT_MARK, MAX_LINE

    book = LogBook("bs", ring_lines=1000, ring_bytes=100_000)
    book.add("stdout", "z" * (MAX_LINE * 10))
    assert book.tail(1)[0].line == "z" * MAX_LINE + CUT_MARK
    for i in range(500):
        book.add("stdout", f"{i:04d}" + "a" * 1000)
    assert sum(len(e.line) for e in book.ring) <= 100_000
    assert book.tail(1)[0].line.startswith("0499")


async def test_a_follower_that_does_not_read_is_dropped_not_buffered():
    book = LogBook("bs", ring_lines=100)
    _, slow = book.follow(0, limit=50_000)
    _, fast = book.follow(0, limit=50_000)
    for _ in range(100):
        book.add("stdout", "b" * 1000)
        while not fast.empty():
            fast.get_nowait()
    assert book.followers == 1 and slow.dropped and not fast.dropped
    got = []
    while not slow.empty():
        got.append(slow.get_nowait())
    assert got[-1] is None and "log follower dropped" in got[-2].line
    assert len(got) == 2  # what was queued is released, not kept
