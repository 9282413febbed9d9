"""The registry's optional state file: an SQLite database, written by group commit off the event loop.

A change is answered only once it is on disk: the changes of one moment are collected, written in
one transaction (synchronous = FULL: fsync'd) on a worker thread, and then all answered together.
A change costs the event loop one small JSON encoding, whatever the size of the table. A state
file of the older JSON format is imported once and kept aside as `<file>.v1.json`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .table import RECORD_FIELDS, ServiceTable

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
RETRY = 1.0   # seconds between attempts to save changes that failed to be saved


class StateNotSaved(Exception):
    """A change could not be written to the state file (full disk, I/O error, ...)."""


def _row(rec: dict) -> str:
    return json.dumps({k: rec.get(k) for k in RECORD_FIELDS}, separators=(",", ":"))


class StateFile:
    """The table on disk: `mark` what changed, `await saved()` to know it is durable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: str | None = None          # why the last write failed; None once one succeeds
        self.commits = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="registry-state")  # owns the connection
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, str | None] = {}    # name -> record as JSON, or None = deleted
        self._waiters: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.epoch: str | None = None          # the table's identity, kept in the file

    # -- start ---------------------------------------------------------------------------
    async def load(self, table: ServiceTable) -> int:
        """Open (or create) the file and restore its records into `table`; how many were loaded."""
        records = await asyncio.get_running_loop().run_in_executor(self._pool, self._open)
        n = table.restore(records)
        if n:
            log.info("restored %d service(s) from %s", n, self.path)
        self._task = asyncio.create_task(self._run(), name="registry-state")
        return n

    def _open(self) -> list[dict]:
        p = Path(self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        for tmp in p.parent.glob(p.name + ".*.tmp"):   # left by a writer that was killed mid-write
            log.warning("removing leftover temporary file %s", tmp)
            tmp.unlink(missing_ok=True)
        legacy = self._legacy_records(p)
        try:
            self._connect()
            rows = self._db.execute("SELECT record FROM services").fetchall()  # type: ignore[union-attr]
        except sqlite3.DatabaseError as exc:
            self._set_aside(p, exc)
            self._connect()
            rows = []
        records = [json.loads(r[0]) for r in rows]
        self.epoch = self._epoch()
        if legacy is not None:
            with self._db:  # type: ignore[union-attr]
                self._db.executemany("INSERT OR REPLACE INTO services (name, record) VALUES (?, ?)",  # type: ignore[union-attr]
                                     [(r["name"], _row(r)) for r in legacy if isinstance(r, dict) and isinstance(r.get("name"), str)])
            records = legacy
        return records

    def _epoch(self) -> str:
        db = self._db
        assert db is not None
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is not None:
            return str(row[0])
        epoch = uuid.uuid4().hex
        db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def _connect(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS services (name TEXT PRIMARY KEY, record TEXT NOT NULL)")

    def _legacy_records(self, p: Path) -> list[dict] | None:
        """Records of a JSON state file (the older format), which is then moved aside; else None."""
        try:
            with open(p, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
            if not head or head == SQLITE_MAGIC:
                return None
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._set_aside(p, exc)
            return None
        records = data.get("services", []) if isinstance(data, dict) else []
        aside = p.with_name(p.name + ".v1.json")
        os.replace(p, aside)
        log.warning("state file %s was in the older JSON format: imported, and kept as %s", p, aside)
        return [r for r in records if isinstance(r, dict)]

    @staticmethod
    def _set_aside(p: Path, exc: Exception) -> None:
        # A corrupt file must not stop the registry; keep it aside for a human to look at.
        aside = p.with_name(p.name + ".corrupt")
        log.error("state file %s is unreadable (%s); moved to %s and starting empty", p, exc, aside)
        try:
            os.replace(p, aside)
        except OSError:
            pass

    # -- changes -------------------------------------------------------------------------
    def mark(self, name: str, rec: dict | None) -> None:
        """Record that `name` changed (`rec` None: it is gone); written with the next batch."""
        self._pending[name] = None if rec is None else _row(rec)
        self._wake.set()

    async def saved(self) -> None:
        """Return once every change marked so far is on disk; raise StateNotSaved if it cannot be."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.error is not None and self._pending:
                try:  # keep trying what failed, so the file catches up once the disk has room again
                    await asyncio.wait_for(self._wake.wait(), RETRY)
                except asyncio.TimeoutError:
                    pass
            else:
                await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            if not batch:
                _answer(waiters, None)
                continue
            try:
                await loop.run_in_executor(self._pool, self._write, batch)
            except (sqlite3.Error, OSError) as exc:
                for name, row in batch.items():   # a newer change of the same record wins
                    self._pending.setdefault(name, row)
                if self.error is None:
                    log.error("cannot write state file %s: %s; changes are answered 503 until it can", self.path, exc)
                self.error = f"{type(exc).__name__}: {exc}"
                _answer(waiters, StateNotSaved(f"the state file {self.path} cannot be written ({exc})"))
            else:
                self.commits += 1
                if self.error is not None and not self._pending:
                    log.warning("state file %s is written again", self.path)
                    self.error = None
                _answer(waiters, None)

    def _write(self, batch: dict[str, str | None]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO services (name, record) VALUES (?, ?)",
                           [(n, row) for n, row in batch.items() if row is not None])
            db.executemany("DELETE FROM services WHERE name = ?", [(n,) for n, row in batch.items() if row is None])
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    # -- stop ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Write what is still pending (best effort) and close the file."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        batch, self._pending = self._pending, {}
        error: Exception | None = None
        if batch and self._db is not None:
            try:
                await loop.run_in_executor(self._pool, self._write, batch)
            except (sqlite3.Error, OSError) as exc:
                log.error("cannot write state file %s at shutdown: %s", self.path, exc)
                error = StateNotSaved(str(exc))
        _answer(self._waiters, error)
        self._waiters = []
        if self._db is not None:
            await loop.run_in_executor(self._pool, self._db.close)
        self._pool.shutdown(wait=True)


def _answer(waiters: list[asyncio.Future], error: Exception | None) -> None:
    for w in waiters:
        if not w.done():
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)
