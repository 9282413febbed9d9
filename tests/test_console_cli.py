"""`console --once` against a real registry (source tree and built pyz), its exit codes, and import isolation."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

import pytest

from harness import ROOT, free_port, http_get_json, http_json, wait_for, write_toml

HOST = "127.0.0.1"
ROLE_MODULES = ["infinilm_svc.registry.app", "infinilm_svc.router.app", "infinilm_svc.babysitter.app",
                "infinilm_svc.mock.app", "infinilm_svc.cli", "infinilm_svc.validate"]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_console_imports_no_server_role():
    """Importing every console module pulls in no registry/router/babysitter/mock module."""
    r = _python("""
        import sys
        import console.app, console.cli, console.poller, console.rows, console.source, console.services, console.models
        import console.detail, console.validation, console.dialogs
        bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['infinilm_svc', 'registry'],
                     ['infinilm_svc', 'router'], ['infinilm_svc', 'babysitter'], ['infinilm_svc', 'mock']))
        print('ROLES:', bad)
        assert not bad, bad
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ROLES: []" in r.stdout


@pytest.mark.parametrize("module", ROLE_MODULES)
def test_role_modules_do_not_import_textual(module):
    """Each server role (and validate, and the CLI) starts without importing textual or the console."""
    r = _python(f"""
        import sys, {module}
        print('TEXTUAL:', 'textual' in sys.modules, 'console' in sys.modules)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TEXTUAL: False False" in r.stdout


@pytest.fixture
def registry(procs, tmp_path):
    """A real registry process with a babysitter, its backend and a router record registered by hand."""
    port = free_port(HOST)
    cfg = write_toml(tmp_path / "node.toml", {"registry": {"bind": HOST, "port": port, "sweep_interval": 0.2}})
    procs.start([sys.executable, "-m", "infinilm_svc", "--config", str(cfg)], name="registry", cwd=ROOT)
    url = f"http://{HOST}:{port}"
    wait_for(lambda: http_get_json(url + "/health", timeout=1)[0] == 200, what="registry /health")
    base = {"host": HOST, "hostname": HOST, "status": "running"}
    records = [
        {**base, "name": "sitter-one", "port": 9101, "url": f"http://{HOST}:9101",
         "metadata": {"type": "mock", "role": "babysitter", "babysitter": "enhanced", "backend": "sitter-one-server",
                      "state": "running"}},
        {**base, "name": "sitter-one-server", "port": 9100, "url": f"http://{HOST}:9100",
         "metadata": {"type": "openai-api", "role": "backend", "parent_service": "sitter-one",
                      "babysitter_url": f"http://{HOST}:9101", "models": ["model-x"], "restarts": 2}},
        {**base, "name": "sitter-two-server", "port": 9200, "url": f"http://{HOST}:9200", "status": "backoff",
         "metadata": {"type": "openai-api", "role": "backend", "models": ["model-x", "model-y"]}},
    ]
    for rec in records:
        status, body = http_json("POST", url + "/services", rec)
        assert status == 201, body
    return url


def _once(args: list[str], registry: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args, "console", "--once", "--registry", registry], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_once_prints_services_and_models_tables(registry):
    """`console --once` lists every record with its state and every model with its backends; exit 0."""
    r = _once([sys.executable, "-m", "infinilm_svc"], registry)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "services @ " + registry + " (3)" in out
    assert "sitter-one-server" in out and "backoff" in out and "running" in out
    lines = {ln.split("│")[1].strip(): ln for ln in out.splitlines() if ln.count("│") > 3}
    assert "model-x" in lines and "1/2" in lines["model-x"], out      # one of its two backends is healthy
    assert "0/1" in lines["model-y"], out


def test_once_with_a_registry_list_reads_through_the_first_that_answers(registry):
    """`--registry dead,live`: the console moves past the dead registry and prints the live one's table."""
    dead = f"http://{HOST}:{free_port(HOST)}"
    r = _once([sys.executable, "-m", "infinilm_svc"], f"{dead},{registry}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sitter-one-server" in r.stdout


def test_once_exits_1_with_a_clear_message_when_registry_is_down():
    """With nothing listening, --once says the registry is unreachable and exits 1."""
    url = f"http://{HOST}:{free_port(HOST)}"
    r = _once([sys.executable, "-m", "infinilm_svc"], url)
    assert r.returncode == 1
    assert f"registry {url} is unreachable" in " ".join(r.stderr.split())


def test_a_registry_that_is_not_a_url_is_a_usage_error():
    """`--registry` (or $INFINILM_REGISTRY_URL) must be an http URL: exit 2 saying so, before any connection."""
    r = subprocess.run([sys.executable, "-m", "infinilm_svc", "console", "--once", "--registry", "registry:18000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "argument --registry: expected an http:// URL, got 'registry:18000'" in r.stderr


@pytest.mark.e2e
def test_once_from_built_pyz(registry, pyz_path):
    """The built pyz runs `console --once` like a user would."""
    r = _once([sys.executable, str(pyz_path)], registry)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sitter-one-server" in r.stdout and "model-y" in r.stdout


@pytest.mark.e2e
def test_stylesheet_ships_and_loads_inside_the_pyz(pyz_path, tmp_path):
    """console.tcss is inside the pyz, and the app run from the pyz applies it (headless)."""
    with zipfile.ZipFile(pyz_path) as z:
        assert any(n.endswith("console/console.tcss") for n in z.namelist())
    script = tmp_path / "headless.py"
    script.write_text(textwrap.dedent("""
        import asyncio, console.app
        from console.rows import Snapshot
        class Source:
            registry_url = "http://127.0.0.1:1"
            async def poll(self):
                return Snapshot(taken_at=0.0, services=(), models=())
        async def main():
            app = console.app.ConsoleApp(Source(), autopoll=False)
            async with app.run_test(size=(100, 20)) as pilot:
                await pilot.pause()
                bar = app.screen.query_one("#status")
                print("FILE", console.app.__file__)
                print("DOCK", bar.styles.dock, "FILTER", app.screen.query_one("#filter").styles.display)
        asyncio.run(main())
    """))
    r = subprocess.run([sys.executable, str(pyz_path), str(script)], capture_output=True, text=True, timeout=60,
                       env={"SHIV_INTERPRETER": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DOCK top FILTER none" in r.stdout
    assert str(ROOT) not in r.stdout      # it ran the console from inside the pyz, not the source tree


@pytest.mark.parametrize("width", [80, 100, 120])
def test_once_on_a_narrow_terminal_drops_columns_never_numbers(width):
    """At 80-120 columns REQS, ERRS and INFL keep every digit; less important columns go first."""
    import io

    from rich.console import Console

    from console.cli import print_tables
    from test_console_views import fake_snapshot

    out = io.StringIO()
    print_tables(fake_snapshot(), "http://127.0.0.2:18000", Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    assert max(len(ln) for ln in text.splitlines()) <= width, text
    for header in ("NAME", "STATE", "REQS", "ERRS", "INFL"):
        assert header in text, text
    lines = text.splitlines()
    header = next(ln for ln in lines if "REQS" in ln)
    row = next(ln for ln in lines if "babysitter-a-server" in ln)
    cells = dict(zip((c.strip() for c in header.split("┃")), (c.strip() for c in row.split("│")), strict=False))
    assert (cells["REQS"], cells["ERRS"], cells["INFL"]) == ("17,102", "2", "1"), text
