"""A DataTable updated in place by row key, so cursor and sort survive every refresh."""
from __future__ import annotations

from typing import Any, Callable

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey


def cell_len(value: Any) -> int:
    """Terminal cells a table cell's text takes on one line."""
    return value.cell_len if isinstance(value, Text) else Text(str(value)).cell_len


def same_cell(a: Any, b: Any) -> bool:
    """Whether two cell values look the same (rich's Text equality ignores the base style)."""
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and str(a.style) == str(b.style) and a.spans == b.spans and a.justify == b.justify
    return type(a) is type(b) and a == b


class KeyedTable(DataTable):
    """Rows are added, updated and removed by key (never cleared and refilled)."""

    def __init__(self, columns: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.column_spec = columns
        self._cells: dict[str, dict[str, Any]] = {}
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.sort_value: Callable[[str, str], Any] = lambda key, column: key

    def on_mount(self) -> None:
        for key, label in self.column_spec:
            self.add_column(label, key=key)

    @property
    def cursor_key(self) -> str | None:
        """The key of the row under the cursor."""
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - cursor outside the table
            return None

    def row_keys(self) -> list[str]:
        """Keys in display order."""
        return [r.key.value for r in self.ordered_rows if r.key.value is not None]

    def sync(self, rows: dict[str, dict[str, Any]]) -> None:
        """Make the table show exactly `rows` (key -> cells by column key), touching only what changed."""
        keep = self.cursor_key
        for key in [k for k in self._cells if k not in rows]:
            self.remove_row(RowKey(key))
            del self._cells[key]
        for key, cells in rows.items():
            old = self._cells.get(key)
            if old is None:
                self.add_row(*(cells[c] for c, _ in self.column_spec), key=key)
            else:
                for c, _ in self.column_spec:
                    if not same_cell(old.get(c), cells[c]):
                        self.update_cell(key, c, cells[c])
            self._cells[key] = cells
        self._fit_columns()
        if self.sort_column is not None:
            self.apply_sort()
        if keep is not None and keep in self._cells:
            self.move_cursor(row=self.get_row_index(keep), animate=False)

    def _mark_sort(self) -> None:
        """The sorting column's header ends in ▲ (ascending) or ▼ (descending)."""
        for key, label in self.column_spec:
            column = self.columns.get(ColumnKey(key))
            if column is not None:
                arrow = ("▼" if self.sort_reverse else "▲") if key == self.sort_column else ""
                column.label = Text(f"{label} {arrow}" if arrow else label)
        self._fit_columns(force=True)

    def _fit_columns(self, force: bool = False) -> None:
        """Every column as wide as its widest cell: a number is never cut (1,710 never shows as 1,71).

        DataTable widens columns lazily and can render rows with the old widths; setting the widths
        here, with the caches dropped, makes the next frame exact.
        """
        changed = force
        for key, _ in self.column_spec:
            column = self.columns.get(ColumnKey(key))
            if column is None:
                continue
            widest = max([cell_len(column.label), *(cell_len(c[key]) for c in self._cells.values())])
            if column.content_width != widest:
                column.content_width = widest
                changed = True
        if changed:
            self._require_update_dimensions = True
            self._clear_caches()
            self.refresh()

    def apply_sort(self) -> None:
        if self.sort_column is None or not self.row_count:
            return
        col = self.sort_column
        self.sort(self.column_spec[0][0],
                  key=lambda first: self.sort_value(str(first), col), reverse=self.sort_reverse)

    def sort_by(self, column: str | None, reverse: bool = False) -> None:
        """Sort by a column (keeps the cursor on its row)."""
        keep = self.cursor_key
        self.sort_column, self.sort_reverse = column, reverse
        self._mark_sort()
        self.apply_sort()
        if keep is not None and keep in self._cells:
            self.move_cursor(row=self.get_row_index(keep), animate=False)
