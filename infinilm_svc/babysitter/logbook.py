"""The backend's log: a size-capped rotating file, an in-memory ring, and live followers."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import NamedTuple

log = logging.getLogger(__name__)


class LogLine(NamedTuple):
    """One captured line."""

    ts: float
    stream: str      # "stdout" | "stderr" | "babysitter"
    line: str

    def as_dict(self) -> dict:
        return {"ts": round(self.ts, 3), "stream": self.stream, "line": self.line}


class RotatingLogFile:
    """Appends lines to a file, rotating it to .1 .. .N when it would exceed max_bytes."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8", errors="replace")
        self._size = self._fh.tell()

    def write(self, text: str) -> None:
        n = len(text.encode("utf-8", "replace"))
        if self.max_bytes > 0 and self._size + n > self.max_bytes and self._size > 0:
            self._rotate()
        self._fh.write(text)
        self._size += n

    def flush(self) -> None:
        self._fh.flush()

    def _rotate(self) -> None:
        self._fh.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src, dst = f"{self.path}.{i}", f"{self.path}.{i + 1}"
                if os.path.exists(src):
                    os.replace(src, dst)
            os.replace(self.path, f"{self.path}.1")
            self._fh = open(self.path, "w", encoding="utf-8", errors="replace")
        else:
            self._fh = open(self.path, "w", encoding="utf-8", errors="replace")
        self._size = 0

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


class LogBook:
    """Where every backend line and babysitter marker goes: ring, file and followers."""

    def __init__(self, name: str, ring_lines: int, file: RotatingLogFile | None = None) -> None:
        self.name = name
        self.ring: collections.deque[LogLine] = collections.deque(maxlen=ring_lines)
        self.file = file
        self._followers: set[asyncio.Queue] = set()
        self._closed = False
        self._echo_log = logging.getLogger(f"infinilm_svc.backend.{name}")

    def add(self, stream: str, line: str) -> None:
        """Record one line (no trailing newline) from `stream`."""
        entry = LogLine(time.time(), stream, line)
        self.ring.append(entry)
        if self.file is not None:
            try:
                self.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(entry.ts))} [{stream}] {line}\n")
            except OSError as exc:  # a full disk must not stop supervision
                log.warning("%s: cannot write the log file: %s", self.name, exc)
                self.file = None
        if self._echo_log.isEnabledFor(logging.DEBUG) or (stream == "babysitter"):
            level = logging.INFO if stream == "babysitter" else logging.DEBUG
            self._echo_log.log(level, "[%s %s] %s", self.name, stream, line)
        for q in tuple(self._followers):
            try:
                q.put_nowait(entry)
            except asyncio.QueueFull:  # a follower too slow to keep up loses lines, not memory
                pass

    def add_lines(self, stream: str, lines: list[str]) -> None:
        for line in lines:
            self.add(stream, line)
        if self.file is not None:
            self.file.flush()

    def marker(self, text: str) -> None:
        """A babysitter line (start, exit, restart, state change) in the backend's log."""
        self.add("babysitter", text)
        if self.file is not None:
            self.file.flush()

    def tail(self, n: int) -> list[LogLine]:
        if n <= 0:
            return []
        ring = self.ring
        if n >= len(ring):
            return list(ring)
        return list(ring)[-n:]

    def follow(self, tail: int, maxsize: int = 10000) -> tuple[list[LogLine], asyncio.Queue]:
        """The last `tail` lines and a queue of every later one (None = the log book closed)."""
        q: asyncio.Queue = asyncio.Queue(maxsize=maxsize)
        if self._closed:
            q.put_nowait(None)
        else:
            self._followers.add(q)
        return self.tail(tail), q

    def unfollow(self, q: asyncio.Queue) -> None:
        self._followers.discard(q)

    def close_followers(self) -> None:
        """End every follow stream (on shutdown)."""
        self._closed = True
        for q in tuple(self._followers):
            try:
                q.put_nowait(None)
            except asyncio.QueueFull:
                q.get_nowait()
                q.put_nowait(None)
        self._followers.clear()

    def close(self) -> None:
        self.close_followers()
        if self.file is not None:
            self.file.close()
            self.file = None
