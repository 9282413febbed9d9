"""How the console shows values: the columns of each table and their formatted, colour-coded cells."""
from __future__ import annotations

import time
from typing import Callable

from rich.text import Text

from infinilm_svc.client.babysitter import LogLine

from .rows import GONE_STATES, Latency, ModelRow, Route, ServiceRow

# Which theme colour each state gets; the names are Textual theme variables ($success, ...).
STATE_KIND = {
    "running": "success", "healthy": "success",
    "starting": "warning", "backoff": "warning", "stopping": "warning", "stale": "warning",
    "unresponsive": "error",
    "fatal": "error", "expired": "error", "stopped": "error", "unknown": "error", "gone": "muted",
}

# Colours for plain rich output (--once), matching the default theme's meaning.
PLAIN_COLOURS = {"success": "green", "warning": "yellow", "error": "red", "muted": "dim"}

SERVICE_COLUMNS: list[tuple[str, str]] = [
    ("name", "NAME"), ("role", "ROLE"), ("address", "ADDRESS"), ("state", "STATE"), ("route", "ROUTED"),
    ("hb", "HEARTBEAT"),
    ("restarts", "RESTARTS"), ("models", "MODELS"), ("requests", "REQS"), ("errors", "ERRS"),
    ("in_flight", "INFL"), ("p50", "P50 ms"), ("p90", "P90 ms"), ("p99", "P99 ms"), ("cache", "CACHE%"),
]
# What a narrow terminal gives up first (`console --once`); names, states and numbers of requests,
# errors and requests in flight are never dropped.
DROP_FIRST = ("p90", "cache", "role", "address", "p99", "models", "restarts", "p50", "hb", "backends", "rate", "lost")

MODEL_COLUMNS: list[tuple[str, str]] = [
    ("name", "MODEL"), ("healthy", "HEALTHY"), ("backends", "BACKENDS"), ("lost", "LOST RECENTLY"), ("rate", "REQ/S"),
    ("requests", "REQS"), ("errors", "ERRS"), ("p50", "P50 ms"), ("p99", "P99 ms"), ("cache", "CACHE%"),
]

Colour = Callable[[str], str]   # state kind -> a colour rich understands
Cell = Text | str                # what a table cell shows


def state_kind(state: str) -> str:
    return STATE_KIND.get(state, "muted")


def fmt_int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def fmt_pct(v: float | None) -> str:
    """A ratio as a percentage: 0.734 -> 73.4."""
    return "-" if v is None else f"{v * 100:.1f}"


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_age(age: float | None) -> str:
    """Heartbeat age: 0.4s, 12s, 3m05s, 2h10m."""
    if age is None:
        return "-"
    if age < 10:
        return f"{age:.1f}s"
    if age < 60:
        return f"{age:.0f}s"
    if age < 3600:
        return f"{int(age // 60)}m{int(age % 60):02d}s"
    return f"{int(age // 3600)}h{int(age % 3600 // 60):02d}m"


def fmt_clock(ts: float) -> str:
    """A log line's time of day in local time."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def state_text(state: str, colour: Colour) -> Text:
    return Text(state, style=f"bold {colour(state_kind(state))}")


def route_text(route: Route | None, colour: Colour, elapsed: float = 0.0) -> Text:
    """Whether the routers route to a backend: `yes`, or `no: why` (an open circuit counts down)."""
    if route is None:
        return Text("-", style="dim")
    if route.ok:
        return Text("yes", style=colour("success"))
    why = route.reason
    if route.retry_in is not None:
        why += f" {max(0.0, route.retry_in - elapsed):.0f}s"
    head = "no" if route.routable == 0 else f"{route.routable}/{route.routers}"
    return Text(f"{head}: {why}", style=colour("error") if route.routable == 0 else colour("warning"))


def service_cells(row: ServiceRow, colour: Colour, elapsed: float = 0.0) -> dict[str, Cell]:
    """The services table's cells for one row, by column key; `elapsed`: seconds since the poll,
    added to heartbeat ages and taken from circuit countdowns so they tick between polls."""
    lat: Latency = row.latency
    age_style = colour("warning") if row.state in ("stale", "expired") else ""
    age = row.heartbeat_age + elapsed if row.heartbeat_age is not None else None
    return {
        "name": Text(row.name, style="dim") if row.state in GONE_STATES else row.name,
        "role": row.role, "address": row.address,
        "state": state_text(row.state, colour),
        "route": route_text(row.route, colour, elapsed),
        "hb": Text(fmt_age(age), style=age_style, justify="right"),
        "restarts": Text(fmt_int(row.restarts), justify="right"),
        "models": ",".join(row.models) or "-",
        "requests": Text(fmt_int(row.requests), justify="right"),
        "errors": Text(fmt_int(row.errors), style=colour("error") if row.errors else "", justify="right"),
        "in_flight": Text(fmt_int(row.in_flight), justify="right"),
        "p50": Text(fmt_ms(lat.p50), justify="right"),
        "p90": Text(fmt_ms(lat.p90), justify="right"),
        "p99": Text(fmt_ms(lat.p99), justify="right"),
        "cache": Text(fmt_pct(row.cache_hit), justify="right"),
    }


def model_cells(row: ModelRow, colour: Colour) -> dict[str, Cell]:
    """The models table's cells for one row, by column key."""
    total = len(row.backends)
    full = row.healthy == total and total and not row.lost
    kind = "success" if full else ("warning" if row.healthy else "error")
    return {
        "name": row.name,
        "healthy": Text(f"{row.healthy}/{total}", style=f"bold {colour(kind)}", justify="right"),
        "backends": ", ".join(row.backends) or "-",
        "lost": Text(", ".join(row.lost), style=colour("warning")) if row.lost else Text("-", style="dim"),
        "rate": Text(fmt_rate(row.rate), justify="right"),
        "requests": Text(fmt_int(row.requests), justify="right"),
        "errors": Text(fmt_int(row.errors), style=colour("error") if row.errors else "", justify="right"),
        "p50": Text(fmt_ms(row.latency.p50), justify="right"),
        "p99": Text(fmt_ms(row.latency.p99), justify="right"),
        "cache": Text(fmt_pct(row.cache_hit), justify="right"),
    }


STREAM_LABELS = {"stdout": "out", "stderr": "err", "babysitter": "bs"}


def log_text(line: LogLine, colour: Colour) -> Text:
    """One log line: time, stream, text; babysitter markers and stderr stand out."""
    style = {"stderr": colour("error"), "babysitter": f"bold {colour('warning')}"}.get(line.stream, "")
    t = Text(fmt_clock(line.ts) + " ", style="dim")
    t.append(f"{STREAM_LABELS.get(line.stream, line.stream[:3]):<3} ", style="dim")
    t.append(line.line, style=style)
    return t
