"""Pilot steps the console tests share: select a services row and ask for an action on it."""
from __future__ import annotations


async def ask_action(pilot, row: str, key: str = "r") -> str:
    """Put the cursor on `row` of the services table, press `key`; the confirmation's question."""
    table = pilot.app.screen.query_one("#services")
    table.move_cursor(row=table.get_row_index(row))
    await pilot.press(key)
    await pilot.pause()
    return str(pilot.app.screen.query_one("#question").render())
