"""The models view: each model, the backends serving it, how many are healthy, its request rate."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from .cells import MODEL_COLUMNS, model_cells
from .rows import Snapshot
from .status import StatusBar
from .table import KeyedTable


class ModelsScreen(Screen):
    """Models and where they run."""

    BINDINGS = [Binding("escape,m", "app.pop_screen", "Back"), Binding("enter", "backends", "Its backends")]

    def __init__(self) -> None:
        super().__init__(id="models-screen")

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield KeyedTable(MODEL_COLUMNS, id="models")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(KeyedTable).focus()
        self.watch(self.app, "snapshot", self.show, init=True)
        self.watch(self.app, "stale", self._show_stale, init=True)

    def _show_stale(self, stale: bool) -> None:
        self.set_class(stale, "-stale")

    def show(self, snapshot: Snapshot | None) -> None:
        if snapshot is None:
            return
        colour = self.app.cell_colour()  # type: ignore[attr-defined]
        table = self.query_one(KeyedTable)
        table.sync({m.name: model_cells(m, colour) for m in snapshot.models})
        table.border_title = f"models [{len(snapshot.models)}]"

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_backends()

    def action_backends(self) -> None:
        """Back to the services view, filtered to the model under the cursor."""
        model = self.query_one(KeyedTable).cursor_key
        self.app.pop_screen()
        if model:
            self.app.screen.show_model(model)  # type: ignore[attr-defined]
