"""`infinilm-svc validate`: the command line, the results table and the JSON report."""
from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import textwrap
from dataclasses import asdict

from ..wire import dumps
from .checks import run_checks
from .options import CheckResult, ExpectedService, ValidateOptions

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def http_url(value: str) -> str:
    """An argparse type: an http(s) URL without its trailing slash."""
    if not re.match(r"^https?://[^/\s]+", value):
        raise argparse.ArgumentTypeError(f"expected an http:// URL, got {value!r}")
    return value.rstrip("/")


def http_urls(value: str) -> str:
    """An argparse type: one http(s) URL, or several separated by commas (tried in order)."""
    items = [i.strip() for i in value.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected http:// URLs separated by commas, got {value!r}")
    return ",".join(http_url(i) for i in items)


def parse_services(text: str) -> tuple[ExpectedService, ...]:
    """`NAME[:MODEL[+MODEL...]],...` -> expected services."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, models = item.partition(":")
        if not name or "/" in name:
            raise UsageError(f"bad service {item!r} in --expect-services (NAME or NAME:MODEL[+MODEL])")
        out.append(ExpectedService(name, tuple(m for m in models.split("+") if m)))
    if not out:
        raise UsageError("--expect-services needs at least one NAME")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinilm-svc validate",
                                description="Check a running deployment, found through its registry.")
    p.add_argument("--registry", type=http_urls, default=ValidateOptions.registry,
                   help="registry URL, or several separated by commas (default %(default)s)")
    p.add_argument("--router", type=http_url, help="router URL (default: the router registered in the registry)")
    p.add_argument("--expect-services", default="babysitter-a:model-1,babysitter-b:model-2,babysitter-c:model-1,babysitter-d:model-2",
                   help="babysitters that must be registered, each NAME[:MODEL[+MODEL]] (default: the demo's)")
    p.add_argument("--expect-models", help="comma list of the models the router must list (default: those of --expect-services)")
    p.add_argument("--expect-hosts", default="2",
                   help="a number of distinct hosts, or a comma list of addresses, the expected records must come from (default 2)")
    p.add_argument("--lb-requests", type=int, default=8, help="requests per model for the load-balancing check (default 8)")
    p.add_argument("--log-tail", type=int, default=2000, help="log lines read from each babysitter (default 2000)")
    p.add_argument("--log-wait", type=float, default=5.0,
                   help="seconds a request may take to appear in its backend's log (default 5)")
    p.add_argument("--chaos", action="store_true", help="also stop one backend through its babysitter, check nothing fails, start it again")
    p.add_argument("--chaos-service", help="the babysitter to stop with --chaos (default: the last one with a peer)")
    p.add_argument("--token", help="babysitter token for GET /logs and POST /stop and /start")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
    p.add_argument("--wait", type=float, default=0.0, help="first wait up to this many seconds for every expected record to be healthy")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def options_from_args(args: argparse.Namespace) -> ValidateOptions:
    """Turn parsed arguments into ValidateOptions; raises UsageError on bad values."""
    services = parse_services(args.expect_services)
    models = tuple(m.strip() for m in args.expect_models.split(",") if m.strip()) if args.expect_models else None
    hosts: tuple[str, ...] = ()
    text = args.expect_hosts.strip()
    if text.isdigit():
        count = int(text)
    else:
        hosts = tuple(h.strip() for h in text.split(",") if h.strip())
        count = len(hosts)
    if args.lb_requests < 2:
        raise UsageError("--lb-requests must be at least 2")
    if args.log_tail < 1 or args.timeout <= 0 or args.wait < 0 or args.log_wait < 0:
        raise UsageError("--log-tail, --timeout must be positive and --wait, --log-wait not negative")
    return ValidateOptions(registry=args.registry, router=args.router, expect_services=services,
                           expect_models=models, expect_hosts=hosts, expect_host_count=count,
                           lb_requests=args.lb_requests, log_tail=args.log_tail, log_wait=args.log_wait,
                           chaos=args.chaos,
                           chaos_service=args.chaos_service, token=args.token, timeout=args.timeout,
                           wait=args.wait)


def format_row(result: CheckResult, width: int = 100) -> str:
    """One table row; long details wrap under the detail column."""
    head = f"{result.number:>3}  {result.name:<22} {result.verdict:<6} "
    lines = textwrap.wrap(result.detail, max(30, width - len(head)), break_on_hyphens=False) or [""]
    return "\n".join([head + lines[0]] + [" " * len(head) + line for line in lines[1:]])


def summary_line(results: list[CheckResult]) -> str:
    passed = sum(r.passed for r in results)
    skipped = sum(not r.ran for r in results)
    return f"{passed} passed, {len(results) - passed - skipped} failed" + (f", {skipped} not run" if skipped else "")


async def _run_cli(options: ValidateOptions, as_json: bool) -> int:
    width = shutil.get_terminal_size((110, 24)).columns
    results: list[CheckResult] = []
    if not as_json:
        print(f"validating the deployment of registry {options.registry}")
        print(f"{'#':>3}  {'check':<22} {'result':<6} detail")
    async for result in run_checks(options):
        results.append(result)
        if not as_json:
            print(format_row(result, width), flush=True)
    if as_json:
        passed = sum(r.passed for r in results)
        print(dumps({"registry": options.registry, "checks": [asdict(r) for r in results],
                     "passed": passed, "failed": len(results) - passed - sum(not r.ran for r in results),
                     "not_run": sum(not r.ran for r in results)}))
    else:
        print(summary_line(results))
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    """`infinilm-svc validate ...`: 0 when every check passes, 1 on any failure, 2 on usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        options = options_from_args(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"infinilm-svc validate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run_cli(options, args.json))
    except KeyboardInterrupt:
        return EXIT_FAIL
