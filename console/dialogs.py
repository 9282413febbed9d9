"""Modal dialogs: the confirmation before acting on a backend, and the key help."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

HELP = """\
[b]Keys[/b]
  [b]?[/b]        this help                 [b]q[/b]      quit
  [b]/[/b]        filter rows               [b]esc[/b]    back / clear filter
  [b]enter[/b]    backend detail (log);     [b]m[/b]      models view
           on a model: its backends
  [b]s[/b]        sort by next column       [b]S[/b]      reverse the sort
  [b]r[/b]        restart backend           [b]x[/b]      stop backend
  [b]t[/b]        start backend             [b]v[/b]      run validation checks
  [b]p[/b]        pause / resume refresh    [b]+ / -[/b]  slower / faster refresh
  [b]R[/b]        reconnect now (when the registry was unreachable)
  [b]^p[/b]       command palette (themes, keys, quit)

[b]Backend detail[/b]
  [b]↑ ↓ PgUp PgDn Home[/b]  scroll the log back (new lines no longer pull it down)
  [b]End[/b]      follow the log again      [b]h[/b]      show / hide probe lines
  [b]c[/b]        clear the log             [b]r x t[/b]  restart / stop / start

Actions go through the backend's babysitter and ask for confirmation first.
The ROUTED column says whether the routers send requests to a backend, or why not.
"""


class ConfirmScreen(ModalScreen[bool]):
    """Asks yes or no; dismisses with True only on an explicit yes."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No"),
                Binding("escape", "answer(False)", "Cancel")]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            if self.detail:
                yield Label(self.detail, id="question-detail")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """The key reference."""

    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
