"""The command line: run roles from config files, or one of the tools (console, validate, mock, ...)."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .loops import LOOPS, LoopUnavailable, default_loop, run

USAGE = """\
infinilm-svc --config FILE [--config FILE ...] [overrides]   run every role the files declare
infinilm-svc console  [--registry URL] [--once]              the ops console
infinilm-svc validate --registry URL [--router URL] ...      check a running deployment
infinilm-svc mock     --name N --port P --models a,b         a mock OpenAI backend
infinilm-svc check-config FILE...                            report every config problem
infinilm-svc --version
"""

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinilm-svc", usage=USAGE,
                                description="Run the roles declared in TOML config files.")
    p.add_argument("--version", action="version", version=f"infinilm-svc {__version__}")
    p.add_argument("--config", "--config-file", dest="configs", action="append", default=[], metavar="FILE",
                   help="node or babysitter TOML file (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument("--loop", default=default_loop(), choices=LOOPS,
                   help="event loop: uvloop where available (auto, the default), or asyncio's own")
    g = p.add_argument_group("overrides (upstream babysitter flags, plus --bind)")
    g.add_argument("--name", help="babysitter name (exactly one babysitter)")
    g.add_argument("--port", type=int, help="backend port P (exactly one babysitter)")
    g.add_argument("--host", help="address the babysitters register (how others reach them)")
    g.add_argument("--registry-url", help="registry URL for the router and every babysitter")
    g.add_argument("--router-url", help="accepted for upstream compatibility; unused")
    g.add_argument("--bind", help="listen address for every role in this process")
    return p


def _print_problems(exc) -> None:
    print(f"infinilm-svc: {len(exc.problems)} config problem(s):", file=sys.stderr)
    for prob in exc.problems:
        print(f"  {prob}", file=sys.stderr)


def check_config(argv: list[str]) -> int:
    """`check-config FILE...`: print every problem (with file, key and line); exit 2 if any."""
    from .config import ConfigError, load_config_files

    p = argparse.ArgumentParser(prog="infinilm-svc check-config")
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    try:
        node = load_config_files(args.files, check_files=True)
    except ConfigError as exc:
        for prob in exc.problems:
            print(prob)
        print(f"{len(exc.problems)} problem(s) found")
        return EXIT_USAGE
    roles = []
    if node.registry:
        roles.append(f"registry on {node.registry.bind}:{node.registry.port}")
    if node.router:
        roles.append(f"router on {node.router.bind}:{node.router.port}")
    for b in node.babysitters:
        roles.append(f"babysitter {b.service_name} (backend {b.backend.type} on port {b.port}, API on {b.api_port})")
    print("ok: " + ("; ".join(roles) if roles else "no roles"))
    return EXIT_OK


def build_apps(node) -> list:
    """One HostedApp per role, in start order: registry, router, babysitters."""
    from .runtime import HostedApp

    apps = []
    if node.registry is not None:
        from .registry.app import create_app as create_registry
        apps.append(HostedApp("registry", "registry", create_registry(node.registry), node.registry.bind, node.registry.port))
    if node.router is not None:
        from .router.app import create_app as create_router
        apps.append(HostedApp("router", node.router.name or "router", create_router(node.router), node.router.bind, node.router.port))
    for b in node.babysitters:
        from .babysitter.app import create_app as create_babysitter
        apps.append(HostedApp("babysitter", b.service_name, create_babysitter(b), b.bind, b.api_port))
    return apps


def run_roles(argv: list[str]) -> int:
    from .config import ConfigError, apply_overrides, load_config_files
    from .logs import configure_logging
    from .runtime import serve

    parser = _run_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if not args.configs:
        parser.print_usage(sys.stderr)
        print("infinilm-svc: error: give at least one --config FILE (or a subcommand)", file=sys.stderr)
        return EXIT_USAGE
    try:
        node = load_config_files(args.configs)
        node = apply_overrides(node, bind=args.bind, host=args.host, registry_url=args.registry_url,
                               router_url=args.router_url, name=args.name, port=args.port)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    if node.empty:
        print("infinilm-svc: the config files declare no role", file=sys.stderr)
        return EXIT_USAGE
    apps = build_apps(node)
    try:
        return run(serve(apps), args.loop)
    except LoopUnavailable as exc:
        print(f"infinilm-svc: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else ""
    rest = argv[1:]
    if cmd == "check-config":
        return check_config(rest)
    if cmd == "mock":
        from .mock.cli import main as mock_main
        return mock_main(rest)
    if cmd == "validate":
        from .validate import main as validate_main
        return validate_main(rest)
    if cmd == "console":
        from console.cli import main as console_main
        return console_main(rest)
    if cmd in ("-h", "--help", "help"):
        _run_parser().print_help()
        return EXIT_OK
    if cmd and not cmd.startswith("-"):
        print(f"infinilm-svc: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    return run_roles(argv)


if __name__ == "__main__":
    sys.exit(main())
