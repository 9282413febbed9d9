"""Config loading: upstream babysitter files load unchanged; every mistake is reported with its line."""
from __future__ import annotations

from pathlib import Path

import pytest

from infinilm_svc.config import ConfigError, apply_overrides, load_config_files

FIX = Path(__file__).parent / "fixtures"
UP = FIX / "upstream"


def problems_of(tmp_path, text: str, name: str = "c.toml") -> list[str]:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config_files([p])
    return [str(pr) for pr in exc.value.problems]


def test_upstream_command_babysitter_file_loads_unchanged():
    node = load_config_files([UP / "command-mock.toml"])
    (b,) = node.babysitters
    assert (b.service_name, b.server_name, b.host, b.port, b.api_port) == (
        "babysitter-a", "babysitter-a-server", "0.0.0.0", 8100, 8101)
    assert b.registry_url == "http://localhost:18000" and b.router_url == "http://localhost:8000"
    assert (b.babysitter.max_restarts, b.babysitter.restart_delay, b.babysitter.heartbeat_interval) == (10000, 5.0, 30.0)
    assert b.backend.type == "command" and b.backend.command == "python3"
    assert b.backend.args == ("/srv/mock_service.py", "--name", "mock-service-a", "--port", "8100", "--models", "model-1")
    assert b.backend.work_dir == "/srv"
    assert node.registry is None and node.router is None


def test_env_table_and_metadata_table_are_kept_and_args_are_not_resplit():
    (b,) = load_config_files([UP / "inference-env-metadata.toml"]).babysitters
    assert "/models/some model with spaces" in b.backend.args
    assert dict(b.backend.env) == {"PATH": "/opt/conda/bin:/usr/bin:/bin", "PYTHONPATH": "/workspace/python",
                                   "VISIBLE_DEVICES": "2"}
    assert dict(b.metadata) == {"cache_type": "static", "static": True}


def test_inline_env_and_default_name_follow_upstream():
    (b,) = load_config_files([UP / "vllm-inline-env.toml"]).babysitters
    assert b.service_name == "vllm-8300" and b.backend.model == "/models/llama"
    assert dict(b.backend.env) == {"CUDA_VISIBLE_DEVICES": "0"}


def test_the_demo_mocks_are_named_as_upstreams_demo_names_them():
    """babysitter-a..d run mock-service-a..d (upstream's validate.sh greps answers for mock-service-[ac])."""
    demo = Path(__file__).parent.parent / "demo" / "integration-validation" / "config"
    for x in "abcd":
        (b,) = load_config_files([demo / f"babysitter-{x}.toml"]).babysitters
        assert (b.service_name, b.backend.mock_name) == (f"babysitter-{x}", f"mock-service-{x}")


def test_mock_backend_type_and_defaults():
    (b,) = load_config_files([UP / "mock-type.toml"]).babysitters
    assert b.backend.models == ("model-a", "model-b", "model-c")
    assert b.host == "localhost" and b.registry_url is None and b.babysitter.max_restarts == 10000


def test_node_file_lists_babysitters_relative_to_itself(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.toml").write_text((UP / "mock-type.toml").read_text())
    node_file = tmp_path / "node.toml"
    node_file.write_text('babysitters = ["sub/b.toml"]\n[registry]\nbind = "127.0.0.1"\nport = 18001\n'
                         '[router]\nport = 8001\nregistry_url = "http://127.0.0.1:18001"\npolicy = "session"\n')
    node = load_config_files([node_file])
    assert node.registry.port == 18001 and node.router.policy == "session"
    assert [b.service_name for b in node.babysitters] == ["mock-one"]
    assert node.babysitters[0].babysitter.log_dir == str((tmp_path / "sub" / "logs").resolve())


def test_every_path_in_a_babysitter_file_is_resolved_when_it_is_read(tmp_path, monkeypatch):
    """Relative paths are the file's directory's, ~ and $VARIABLES are expanded, and log_file sits
    in log_dir: the loaded config holds absolute paths, whatever the working directory is later."""
    monkeypatch.setenv("MODELS", "/models")
    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "b.toml"
    f.write_text('port = 8500\n[backend]\ntype = "llama.cpp"\nmodel_path = "$MODELS/tiny.gguf"\nwork_dir = "run"\n'
                 '[babysitter]\nlog_dir = "~/bs-logs"\nlog_file = "engine.log"\n')
    g = tmp_path / "conf" / "c.toml"
    g.write_text('port = 8600\n[backend]\ntype = "infinilm"\nmodel_path = "m"\n[babysitter]\nlog_file = "x/c.log"\n')
    monkeypatch.chdir("/")
    b, c = load_config_files([f, g]).babysitters
    here = tmp_path.resolve() / "conf"
    assert b.backend.model_path == "/models/tiny.gguf" and b.backend.work_dir == str(here / "run")
    home = Path("~").expanduser()
    assert (b.babysitter.log_dir, b.babysitter.log_file) == (str(home / "bs-logs"), str(home / "bs-logs" / "engine.log"))
    assert c.backend.model_path == str(here / "m") and c.backend.work_dir is None
    assert (c.babysitter.log_dir, c.babysitter.log_file) == (str(here / "logs"), str(here / "logs" / "x" / "c.log"))


def test_two_babysitters_with_one_name_are_reported_at_the_second_file(tmp_path):
    for n, port in (("a", 8700), ("b", 8800)):
        (tmp_path / f"{n}.toml").write_text(f'name = "same"\nport = {port}\n[backend]\ntype = "mock"\nmodels = ["m"]\n')
    with pytest.raises(ConfigError) as exc:
        load_config_files([tmp_path / "a.toml", tmp_path / "b.toml"])
    assert [str(p) for p in exc.value.problems] == [f"{tmp_path / 'b.toml'}: name: two babysitters are named 'same'"]


def test_three_mistakes_are_all_reported_with_file_key_and_line():
    with pytest.raises(ConfigError) as exc:
        load_config_files([FIX / "node-three-mistakes.toml"])
    msgs = sorted(str(p) for p in exc.value.problems)
    assert len(msgs) == 3, msgs
    f = str(FIX / "node-three-mistakes.toml")
    assert any(m.startswith(f"{f}:3: registry.port: port must be between 1 and 65535") for m in msgs), msgs
    assert any(m.startswith(f"{f}:4: registry.heartbeat_tll: unknown key") for m in msgs), msgs
    assert any(m.startswith(f"{f}:8: router.retries: expected integer, got string") for m in msgs), msgs


@pytest.mark.parametrize("text, expected", [
    ("port = 8100\n", "backend: required key is missing"),
    ('port = "8100"\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "port: expected integer, got string"),
    ('port = 8100\n[backend]\ntype = "rocket"\n', "unknown backend type 'rocket'"),
    ('port = 8100\n[backend]\ntype = "command"\n', 'needs command = "program"'),
    ('port = 8100\n[backend]\ntype = "mock"\n', 'needs models'),
    ('port = 8100\nname = "a/b"\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "contain no '/'"),
    ('port = 8100\nregistry_url = "localhost:18000"\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "http:// or https:// URL"),
    ('port = 8100\n[babysitter]\nrestart_delay = -1\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "restart_delay must be >= 0"),
    ('port = 8100\n[babysitter]\nlog_backups = -1\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "babysitter.log_backups: log_backups must be >= 0, got -1"),
    ('port = 8100\n[backend]\ntype = "mock"\nmodels = ["m"]\nargs = "x y"\n', "backend.args: expected array of strings"),
    ('port = 8100\n[backend]\ntype = "mock"\nmodels = ["m"]\nenv = { A = 1 }\n', "backend.env.A: expected string"),
    ('port = 8100\nregistry_url = 5\n[backend]\ntype = "mock"\nmodels = ["m"]\n', "registry_url: expected string or array of strings, got integer"),
    ("[registry\nport = 1\n", "invalid TOML"),
    ("[router]\nport = 8000\n", "needs registry_url or static_services"),
    ("nothing = 1\n", "declares no role"),
    ('port = 8100\n[backend]\ntype = "command"\ncommand = "x"\nmock_name = "m"\n', 'mock_name is the non-empty name of a type = "mock" backend'),
    ('[registry]\nport = 18000\n[router]\nport = 18000\nregistry_url = "http://127.0.0.1:18000"\n', "also used by the registry"),
])
def test_each_mistake_gets_a_clear_message(tmp_path, text, expected):
    msgs = problems_of(tmp_path, text)
    assert any(expected in m for m in msgs), msgs
    assert all(m.startswith(str(tmp_path / "c.toml")) or m.startswith("[") for m in msgs), msgs


def test_problems_are_reported_in_file_and_line_order():
    """check-config lists problems as a reader meets them: by line (the README shows this order)."""
    with pytest.raises(ConfigError) as exc:
        load_config_files([FIX / "node-three-mistakes.toml"])
    assert [(p.line, p.key) for p in exc.value.problems] == [
        (3, "registry.port"), (4, "registry.heartbeat_tll"), (8, "router.retries")]


def test_a_listed_babysitter_file_that_does_not_exist_is_reported_at_the_node_files_line(tmp_path):
    node = tmp_path / "node.toml"
    node.write_text('babysitters = ["a.toml", "missing.toml"]\n[registry]\nport = 70000\nbind = "127.0.0.1"\n')
    (tmp_path / "a.toml").write_text((UP / "mock-type.toml").read_text())
    msgs = problems_of(tmp_path, node.read_text(), "node.toml")
    assert msgs[0].startswith(f"{node}:1: babysitters: 'missing.toml': no such babysitter file"), msgs
    assert msgs[1].startswith(f"{node}:3: registry.port"), msgs


def test_babysitters_after_a_table_says_it_must_come_before_the_first_table(tmp_path):
    """In TOML `babysitters = [...]` after [router] is a router key; the message says where it belongs."""
    msgs = problems_of(tmp_path, '[router]\nport = 8000\nregistry_url = "http://127.0.0.1:18000"\n'
                                 'babysitters = ["a.toml"]\n')
    assert msgs == [f"{tmp_path / 'c.toml'}:4: router.babysitters: babysitters = [...] must come before the first "
                    "table: written after [router], TOML reads it as a key of [router]"]


def test_the_readme_node_file_example_is_valid(tmp_path):
    """The node file the README shows loads as what it says (babysitters listed, registry, router)."""
    import re
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"A \*\*node file\*\*.*?```toml\n(.*?)```", readme, re.S).group(1)
    assert "babysitters" in block
    with pytest.raises(ConfigError) as exc:     # its babysitter files are not here: only that is wrong
        load_config_files([_write(tmp_path, block)])
    assert all("no such babysitter file" in p.message for p in exc.value.problems), exc.value.problems


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "node.toml").write_text(text)
    return tmp_path / "node.toml"


def test_missing_file_is_a_problem_not_a_crash(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config_files([tmp_path / "nope.toml"])
    assert "cannot read file" in str(exc.value)


def test_problems_from_several_files_are_reported_together(tmp_path):
    a = tmp_path / "a.toml"
    a.write_text("[registry]\nport = 0\n")
    b = tmp_path / "b.toml"
    b.write_text('port = 8100\n[backend]\ntype = "mock"\n')
    with pytest.raises(ConfigError) as exc:
        load_config_files([a, b])
    files = {p.file for p in exc.value.problems}
    assert files == {str(a), str(b)}


def test_overrides_apply_to_babysitters_router_and_bind():
    node = load_config_files([UP / "command-mock.toml"])
    node = apply_overrides(node, host="127.0.0.9", registry_url="http://127.0.0.2:18000", bind="127.0.0.9",
                           name="other", port=9100)
    (b,) = node.babysitters
    assert (b.host, b.registry_url, b.bind, b.service_name, b.port) == (
        "127.0.0.9", "http://127.0.0.2:18000", "127.0.0.9", "other", 9100)


def test_name_override_needs_exactly_one_babysitter(tmp_path):
    node = load_config_files([UP / "command-mock.toml", UP / "mock-type.toml"])
    with pytest.raises(ConfigError, match="exactly one babysitter"):
        apply_overrides(node, name="x")


def test_bearer_tokens_scheme_any_case_and_key_rings():
    from infinilm_svc.auth import KeyRing, bearer_token

    assert bearer_token("Bearer abc") == bearer_token("bearer abc") == bearer_token("BEARER  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    ring = KeyRing(["k1", "k2"])
    assert ring.allows("Bearer k1") and ring.allows("bearer k2")
    assert not ring.allows("Bearer k3") and not ring.allows("k1") and not ring.allows(None)
    assert KeyRing([]).allows(None) and KeyRing([]).open
