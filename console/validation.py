"""The validation screen: runs the `validate` checks against the deployment and shows each result as it arrives."""
from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from .rows import GONE_STATES, Snapshot
from .status import StatusBar
from .table import KeyedTable

CHECK_COLUMNS = [("number", "#"), ("name", "CHECK"), ("result", "RESULT"), ("detail", "DETAIL"), ("took", "TOOK")]


def validate_options(module: Any, registry: str, token: str | None, snapshot: Snapshot | None) -> Any:
    """Options for validate.run_checks: check the deployment as the registry shows it now."""
    kw: dict[str, Any] = {"registry": registry, "token": token}
    expected_cls = getattr(module, "ExpectedService", None)
    if snapshot is not None and expected_cls is not None:
        sitters = [r for r in snapshot.services if r.role == "babysitter" and r.state not in GONE_STATES]
        if sitters:
            kw["expect_services"] = tuple(expected_cls(r.name, r.models) for r in sitters)
            hosts = {r.host for r in snapshot.services if r.role in ("babysitter", "backend")}
            kw["expect_host_count"] = max(1, len(hosts))
    return module.ValidateOptions(**kw)


class ValidationScreen(Screen):
    """Runs the checks once per visit (`v` again reruns them)."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("v", "rerun", "Run again")]

    def __init__(self) -> None:
        super().__init__(id="validation-screen")

    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        yield Static("starting…", id="vstatus")
        yield KeyedTable(CHECK_COLUMNS, id="checks")
        yield Footer()

    def on_mount(self) -> None:
        self.action_rerun()

    def action_rerun(self) -> None:
        self.query_one("#checks", KeyedTable).sync({})
        self.run_worker(self._run(), group="validate", exclusive=True)

    async def _run(self) -> None:
        status = self.query_one("#vstatus", Static)
        table = self.query_one("#checks", KeyedTable)
        colour = self.app.colour  # type: ignore[attr-defined]
        try:
            from infinilm_svc import validate
            run_checks = validate.run_checks
            options = validate_options(validate, self.app.source.registry_url,  # type: ignore[attr-defined]
                                       getattr(self.app.source, "token", None), self.app.snapshot)  # type: ignore[attr-defined]
        except (ImportError, AttributeError, TypeError) as exc:
            status.update(Text(f"validation is not available in this build: {exc}", style=colour("error")))
            return
        status.update(f"running the checks against {options.registry} …")
        rows: dict[str, dict[str, Any]] = {}
        passed = failed = skipped = 0
        started = last = time.monotonic()
        try:
            async for result in run_checks(options):
                now = time.monotonic()
                ok = bool(result.passed)
                ran = getattr(result, "ran", True)
                passed += ok
                failed += ran and not ok
                skipped += not ran
                kind = "success" if ok else ("error" if ran else "warning")
                rows[str(result.number)] = {
                    "number": str(result.number), "name": result.name,
                    "result": Text("PASS" if ok else ("FAIL" if ran else "SKIP"), style=f"bold {colour(kind)}"),
                    "detail": result.detail, "took": f"{now - last:.1f}s",
                }
                last = now
                table.sync(rows)
                status.update(f"running… {passed} passed, {failed} failed")
        except Exception as exc:  # noqa: BLE001 - a crash in the checks is shown, not fatal to the console
            status.update(Text(f"the checks stopped: {type(exc).__name__}: {exc}", style=colour("error")))
            return
        kind = "success" if failed == skipped == 0 and passed else "error"
        not_run = f", {skipped} not run" if skipped else ""
        status.update(Text(f"done in {time.monotonic() - started:.1f}s: {passed} passed, {failed} failed{not_run}",
                           style=f"bold {colour(kind)}"))
