"""The detail view's log: scrolls back from the keyboard, follows at the bottom, can hide probe lines."""
from __future__ import annotations

import re
from collections import deque

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.widgets import RichLog

from infinilm_svc.client.babysitter import LogLine

# Requests the babysitter, the routers and the registry make to check a backend: health checks and
# model-list reads. The mock logs `method=GET path=/health`; servers such as vLLM or uvicorn log
# `"GET /health HTTP/1.1"`.
PROBE = re.compile(r'method=(?:GET|HEAD) path=/(?:health|models|v1/models)\b'
                   r'|"(?:GET|HEAD) /(?:health|models|v1/models)[ ?"]')
KEEP = 5000


def is_probe(line: LogLine) -> bool:
    """A backend log line that records a health or model-list probe (not a user's request)."""
    return line.stream != "babysitter" and PROBE.search(line.line) is not None


class LogView(RichLog):
    """A RichLog that follows new lines only while scrolled to the bottom, and filters probe lines."""

    BINDINGS = [Binding("h", "toggle_probes", "Probes")]

    def __init__(self, **kw) -> None:
        super().__init__(max_lines=KEEP, wrap=True, markup=False, highlight=False, auto_scroll=True, **kw)
        self.hide_probes = True
        self.entries: deque[tuple[LogLine | None, Text]] = deque(maxlen=KEEP)
        self.hidden = 0
        self._wrapped_at: int | None = None

    @property
    def following(self) -> bool:
        """At the bottom (new lines scroll into view); scrolled back, the view stays where it is."""
        return self.scroll_y >= self.max_scroll_y

    def add(self, line: LogLine | None, text: Text) -> None:
        """Keep a line (None: a note of ours) and show it unless it is a hidden probe."""
        self.entries.append((line, text))
        if line is not None and self.hide_probes and is_probe(line):
            self.hidden += 1
            self._title()
            return
        self.write(text, width=self._wrap_width(), scroll_end=self.following)

    def _wrap_width(self) -> int | None:
        """Wrap long lines at the visible width (RichLog would measure them against the terminal)."""
        width = self.scrollable_content_region.width
        return width if width > 0 else None

    def on_resize(self, event: events.Resize) -> None:
        # Lines wrapped for the old width are wrapped again for the new one.
        if self._wrap_width() != self._wrapped_at:
            self._wrapped_at = self._wrap_width()
            self.refill()

    def action_toggle_probes(self) -> None:
        self.hide_probes = not self.hide_probes
        self.refill()

    def refill(self) -> None:
        """Show the kept lines again under the current filter, at the bottom."""
        self.clear()
        self.hidden = 0
        for line, text in self.entries:
            if line is not None and self.hide_probes and is_probe(line):
                self.hidden += 1
            else:
                self.write(text, width=self._wrap_width(), scroll_end=True)
        self._title()

    def forget(self) -> None:
        self.entries.clear()
        self.hidden = 0
        self.clear()
        self._title()

    def _title(self) -> None:
        state = f"{self.hidden} probe lines hidden (h shows them)" if self.hide_probes else "probes shown (h hides them)"
        self.border_subtitle = state
