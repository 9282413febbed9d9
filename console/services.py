"""The services view: one row per registry record, live, filterable, sortable."""
from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input

from .cells import SERVICE_COLUMNS, service_cells
from .rows import ServiceRow, Snapshot
from .status import StatusBar
from .table import KeyedTable

SORT_VALUE = {
    "name": lambda r: r.name, "role": lambda r: r.role, "address": lambda r: (r.host, r.port),
    "state": lambda r: r.state, "hb": lambda r: r.heartbeat_age if r.heartbeat_age is not None else -1.0,
    "restarts": lambda r: r.restarts or 0, "models": lambda r: r.models, "requests": lambda r: r.requests or 0,
    "errors": lambda r: r.errors or 0, "in_flight": lambda r: r.in_flight or 0,
    "p50": lambda r: r.latency.p50 or 0.0, "p90": lambda r: r.latency.p90 or 0.0, "p99": lambda r: r.latency.p99 or 0.0,
    "cache": lambda r: r.cache_hit if r.cache_hit is not None else -1.0,
}


class ServicesScreen(Screen):
    """Every service with its state, heartbeat, restarts, models and router statistics."""

    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("enter", "detail", "Detail", show=False),
        Binding("m", "app.models", "Models"),
        Binding("s", "sort_next", "Sort"),
        Binding("S", "sort_reverse", "Reverse", show=False),
        Binding("r", "act('restart')", "Restart"),
        Binding("x", "act('stop')", "Stop"),
        Binding("t", "act('start')", "Start"),
        Binding("v", "app.validate", "Validate"),
    ]

    def __init__(self) -> None:
        super().__init__(id="services-screen")
        self.filter_text = ""
        self._rows: dict[str, ServiceRow] = {}

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield KeyedTable(SERVICE_COLUMNS, id="services")
        yield Input(placeholder="filter: name, role, address, state or model (enter keeps it, esc clears)",
                    id="filter")
        yield Footer()

    @property
    def table(self) -> KeyedTable:
        return self.query_one("#services", KeyedTable)

    def on_mount(self) -> None:
        self.table.sort_value = lambda key, col: SORT_VALUE[col](self._rows[key])
        self.table.focus()
        self.watch(self.app, "snapshot", self.show, init=True)
        self.watch(self.app, "stale", self._mark_stale, init=True)
        # Ages and circuit countdowns tick every second between polls.
        self.set_interval(1.0, lambda: self.show(self.app.snapshot))  # type: ignore[attr-defined]

    def _mark_stale(self, stale: bool) -> None:
        self.set_class(stale, "-stale")
        self.show(self.app.snapshot)  # type: ignore[attr-defined]

    def show(self, snapshot: Snapshot | None) -> None:
        """Bring the table up to date with a snapshot (filtered)."""
        if snapshot is None:
            return
        app = self.app
        colour = app.cell_colour()  # type: ignore[attr-defined]
        elapsed = app.data_age()  # type: ignore[attr-defined]
        rows = [r for r in snapshot.services if r.matches(self.filter_text)]
        self._rows = {r.name: r for r in snapshot.services}
        self.table.sync({r.name: service_cells(r, colour, elapsed) for r in rows})
        shown = f"{len(rows)}/{len(snapshot.services)}" if self.filter_text else str(len(rows))
        self.table.border_title = f"services [{shown}]" + (f" filter: {self.filter_text}" if self.filter_text else "")

    @property
    def selected(self) -> ServiceRow | None:
        key = self.table.cursor_key
        return self._rows.get(key) if key else None

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.show(self.app.snapshot)  # type: ignore[attr-defined]

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_detail()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        col = event.column_key.value
        reverse = not self.table.sort_reverse if col == self.table.sort_column else False
        self.table.sort_by(col, reverse)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-visible")
        box.focus()

    def show_model(self, model: str) -> None:
        """Filter to the services of one model (the models view's `enter`)."""
        box = self.query_one("#filter", Input)
        box.value = model
        box.add_class("-visible")
        self.filter_text = model
        self.table.focus()
        self.show(self.app.snapshot)  # type: ignore[attr-defined]

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("-visible")
        self.filter_text = ""
        self.table.focus()
        self.show(self.app.snapshot)  # type: ignore[attr-defined]

    def action_sort_next(self) -> None:
        keys = [k for k, _ in SERVICE_COLUMNS]
        cur = self.table.sort_column
        nxt = keys[(keys.index(cur) + 1) % len(keys)] if cur in keys else keys[0]
        self.table.sort_by(nxt, False)
        self.notify(f"sorted by {dict(SERVICE_COLUMNS)[nxt]}", timeout=1.5)

    def action_sort_reverse(self) -> None:
        self.table.sort_by(self.table.sort_column or "name", not self.table.sort_reverse)

    def action_detail(self) -> None:
        self.app.open_detail(self.selected)  # type: ignore[attr-defined]

    def action_act(self, action: str) -> None:
        self.app.confirm_action(self.selected, action)  # type: ignore[attr-defined]

    def check_action(self, action: str, parameters: tuple[Any, ...]) -> bool | None:
        # While typing a filter, letters belong to the filter box.
        if self.query_one("#filter", Input).has_focus and action in ("sort_next", "sort_reverse", "act"):
            return False
        return True
