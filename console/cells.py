"""How the console shows values: the columns of each table and their formatted, colour-coded cells."""
from __future__ import annotations

import time
from typing import Callable

from rich.text import Text

from .data import Latency, LogLine, ModelRow, ServiceRow

# Which theme colour each state gets; the names are Textual theme variables ($success, ...).
STATE_KIND = {
    "running": "success", "healthy": "success",
    "starting": "warning", "backoff": "warning", "stopping": "warning", "stale": "warning",
    "unresponsive": "error",
    "fatal": "error", "expired": "error", "stopped": "error", "unknown": "error",
}

# Colours for plain rich output (--once), matching the default theme's meaning.
PLAIN_COLOURS = {"success": "green", "warning": "yellow", "error": "red", "muted": "dim"}

SERVICE_COLUMNS: list[tuple[str, str]] = [
    ("name", "NAME"), ("role", "ROLE"), ("address", "ADDRESS"), ("state", "STATE"), ("hb", "HEARTBEAT"),
    ("restarts", "RESTARTS"), ("models", "MODELS"), ("requests", "REQS"), ("errors", "ERRS"),
    ("in_flight", "INFL"), ("p50", "P50 ms"), ("p90", "P90 ms"), ("p99", "P99 ms"),
]
MODEL_COLUMNS: list[tuple[str, str]] = [
    ("name", "MODEL"), ("healthy", "HEALTHY"), ("backends", "BACKENDS"), ("rate", "REQ/S"),
    ("requests", "REQS"), ("errors", "ERRS"), ("p50", "P50 ms"), ("p99", "P99 ms"),
]

Colour = Callable[[str], str]   # state kind -> a colour rich understands


def state_kind(state: str) -> str:
    return STATE_KIND.get(state, "muted")


def fmt_int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


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


def service_cells(row: ServiceRow, colour: Colour) -> dict[str, object]:
    """The services table's cells for one row, by column key."""
    lat: Latency = row.latency
    age_style = colour("warning") if row.state == "stale" else ""
    return {
        "name": row.name, "role": row.role, "address": row.address,
        "state": state_text(row.state, colour),
        "hb": Text(fmt_age(row.heartbeat_age), style=age_style, justify="right"),
        "restarts": Text(fmt_int(row.restarts), justify="right"),
        "models": ",".join(row.models) or "-",
        "requests": Text(fmt_int(row.requests), justify="right"),
        "errors": Text(fmt_int(row.errors), style=colour("error") if row.errors else "", justify="right"),
        "in_flight": Text(fmt_int(row.in_flight), justify="right"),
        "p50": Text(fmt_ms(lat.p50), justify="right"),
        "p90": Text(fmt_ms(lat.p90), justify="right"),
        "p99": Text(fmt_ms(lat.p99), justify="right"),
    }


def model_cells(row: ModelRow, colour: Colour) -> dict[str, object]:
    """The models table's cells for one row, by column key."""
    total = len(row.backends)
    kind = "success" if row.healthy == total and total else ("warning" if row.healthy else "error")
    return {
        "name": row.name,
        "healthy": Text(f"{row.healthy}/{total}", style=f"bold {colour(kind)}", justify="right"),
        "backends": ", ".join(row.backends) or "-",
        "rate": Text(fmt_rate(row.rate), justify="right"),
        "requests": Text(fmt_int(row.requests), justify="right"),
        "errors": Text(fmt_int(row.errors), style=colour("error") if row.errors else "", justify="right"),
        "p50": Text(fmt_ms(row.latency.p50), justify="right"),
        "p99": Text(fmt_ms(row.latency.p99), justify="right"),
    }


STREAM_LABELS = {"stdout": "out", "stderr": "err", "babysitter": "bs"}


def log_text(line: LogLine, colour: Colour) -> Text:
    """One log line: time, stream, text; babysitter markers and stderr stand out."""
    style = {"stderr": colour("error"), "babysitter": f"bold {colour('warning')}"}.get(line.stream, "")
    t = Text(fmt_clock(line.ts) + " ", style="dim")
    t.append(f"{STREAM_LABELS.get(line.stream, line.stream[:3]):<3} ", style="dim")
    t.append(line.line, style=style)
    return t
