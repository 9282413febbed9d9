"""The registry's optional state file: the table written atomically on change, read at start."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from pathlib import Path

from .table import RECORD_FIELDS, ServiceTable

log = logging.getLogger(__name__)


def load_state(path: str, table: ServiceTable) -> int:
    """Restore records from `path` (missing file = empty table); returns how many were loaded."""
    p = Path(path)
    if not p.exists():
        return 0
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # A corrupt file must not stop the registry; keep it aside for a human to look at.
        aside = p.with_suffix(p.suffix + ".corrupt")
        log.error("state file %s is unreadable (%s); moved to %s and starting empty", p, exc, aside)
        try:
            os.replace(p, aside)
        except OSError:
            pass
        return 0
    records = data.get("services", []) if isinstance(data, dict) else []
    n = table.restore(records)
    log.info("restored %d service(s) from %s", n, p)
    return n


def save_state(path: str, table: ServiceTable) -> None:
    """Write the table to `path` atomically (temp file in the same directory, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": 1,
        "services": [{k: rec.get(k) for k in RECORD_FIELDS} for rec in table.records.values()],
    }
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StateWriter:
    """Coalesces table changes into at most one write per `min_interval` seconds."""

    def __init__(self, path: str, table: ServiceTable, min_interval: float = 0.2) -> None:
        self.path = path
        self.table = table
        self.min_interval = min_interval
        self._dirty = asyncio.Event()
        table.on_change.append(self._dirty.set)

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.flush()
            await asyncio.sleep(self.min_interval)

    def flush(self) -> None:
        try:
            save_state(self.path, self.table)
        except OSError as exc:
            log.error("cannot write state file %s: %s", self.path, exc)
