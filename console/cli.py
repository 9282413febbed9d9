"""`infinilm-svc console`: parse options, then run the TUI or print the tables once (--once)."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from infinilm_svc.validate.cli import http_urls

if TYPE_CHECKING:
    from .cells import Cell

DEFAULT_REGISTRY = "http://127.0.0.1:18000"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinilm-svc console",
                                description="The ops console: live services, models, logs and actions.")
    p.add_argument("--registry", type=http_urls, default=os.environ.get("INFINILM_REGISTRY_URL", DEFAULT_REGISTRY),
                   help=f"registry URL, or several separated by commas (default $INFINILM_REGISTRY_URL or {DEFAULT_REGISTRY})")
    p.add_argument("--once", action="store_true", help="print the services and models tables and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--token", default=os.environ.get("INFINILM_TOKEN"),
                   help="bearer token for babysitter logs and actions (default $INFINILM_TOKEN)")
    return p


async def _poll_once(registry: str):
    import aiohttp

    from .poller import Poller

    async with aiohttp.ClientSession() as session:
        return await Poller(session, registry).poll()


def print_once(registry: str, out=None) -> int:
    """Print services and models as rich tables; 0 if the registry answered, 1 if not."""
    from rich.console import Console

    from infinilm_svc.client.registry import RegistryUnavailable

    console = Console(file=out or sys.stdout)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=out or sys.stdout, width=220)   # scripts get whole rows, not ellipses
    try:
        snap = asyncio.run(_poll_once(registry))
    except RegistryUnavailable as exc:
        Console(file=sys.stderr).print(f"[bold red]registry {registry} is unreachable:[/] {exc}", markup=True,
                                       highlight=False)
        return 1
    print_tables(snap, registry, console)
    return 0


def fitting_columns(columns: list[tuple[str, str]], cells: list[dict[str, Cell]], width: int) -> list[tuple[str, str]]:
    """The columns that fit in `width`, dropping the least important first; never a number's column."""
    from .cells import DROP_FIRST

    def need(key: str, label: str) -> int:
        return max([len(label), *(len(getattr(c[key], "plain", str(c[key]))) for c in cells)]) + 3  # padding, border

    kept = list(columns)
    for key in DROP_FIRST:
        if sum(need(k, lab) for k, lab in kept) + 1 <= width:
            break
        kept = [(k, lab) for k, lab in kept if k != key]
    return kept


def print_tables(snap, registry: str, console) -> None:
    """The services and models tables of one snapshot, fitted to the console's width."""
    from rich.table import Table

    from .cells import MODEL_COLUMNS, PLAIN_COLOURS, SERVICE_COLUMNS, model_cells, service_cells

    def table(title: str, columns: list[tuple[str, str]], cells: list[dict[str, Cell]]) -> Table:
        out = Table(title=f"{title} ({len(cells)})", title_justify="left")
        kept = fitting_columns(columns, cells, console.width)
        for key, label in kept:
            # Numbers are never cut (their columns are never squeezed); long text folds onto a second line.
            wraps = key in ("name", "models", "backends", "route")
            out.add_column(label, no_wrap=not wraps, overflow="fold" if wraps else "ellipsis")
        for row in cells:
            out.add_row(*(row[k] for k, _ in kept))
        return out

    def colour(kind: str) -> str:
        return PLAIN_COLOURS.get(kind, "")

    console.print(table(f"services @ {registry}", SERVICE_COLUMNS, [service_cells(r, colour) for r in snap.services]))
    console.print(table("models", MODEL_COLUMNS, [model_cells(m, colour) for m in snap.models]))
    for err in snap.router_errors:
        console.print(f"[yellow]router statistics unavailable:[/] {err}", highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.interval <= 0:
        print("infinilm-svc console: --interval must be > 0", file=sys.stderr)
        return 2
    if args.once:
        return print_once(args.registry)
    from .app import ConsoleApp
    from .source import HttpSource

    app = ConsoleApp(HttpSource(args.registry, token=args.token), interval=args.interval)
    app.run()
    return app.return_code or 0
