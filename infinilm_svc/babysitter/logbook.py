"""The backend's log: a size-capped rotating file, an in-memory ring, and live followers."""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import NamedTuple

log = logging.getLogger(__name__)

MAX_LINE = 16384                 # characters kept of one line; the rest is cut and the cut marked
CUT_MARK = " [... line cut: longer than 16384 characters]"
LINE_OVERHEAD = 64               # bytes counted per line on top of its text (the tuple, the float)
FOLLOWER_BUFFER = 1 << 20        # bytes a follower may have queued before it is dropped


def cut_line(line: str) -> str:
    """The line, cut at MAX_LINE characters and marked when it was longer."""
    return line if len(line) <= MAX_LINE else line[:MAX_LINE] + CUT_MARK


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


class Follower:
    """One live reader of the log: a queue bounded in bytes; a reader that falls too far behind
    is dropped (its stream ends with a line saying so) rather than pinning memory."""

    def __init__(self, limit: int = FOLLOWER_BUFFER) -> None:
        self.queue: asyncio.Queue[LogLine | None] = asyncio.Queue()
        self.pending = 0
        self.limit = limit
        self.dropped = False

    def offer(self, entry: LogLine) -> bool:
        """Queue a line; False (and the follower ends) when it would exceed the buffer."""
        size = len(entry.line) + LINE_OVERHEAD
        if self.pending + size > self.limit:
            self.drop(f"log follower dropped: more than {self.limit} bytes waiting to be read")
            return False
        self.pending += size
        self.queue.put_nowait(entry)
        return True

    def drop(self, why: str) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.pending = 0
        self.dropped = True
        self.queue.put_nowait(LogLine(time.time(), "babysitter", why))
        self.queue.put_nowait(None)

    def end(self) -> None:
        self.queue.put_nowait(None)

    def _taken(self, e: LogLine | None) -> LogLine | None:
        if e is not None:
            self.pending = max(0, self.pending - len(e.line) - LINE_OVERHEAD)
        return e

    async def get(self) -> LogLine | None:
        return self._taken(await self.queue.get())

    def get_nowait(self) -> LogLine | None:
        return self._taken(self.queue.get_nowait())

    def empty(self) -> bool:
        return self.queue.empty()


class LogBook:
    """Where every backend line and babysitter marker goes: ring, file and followers.

    The ring is bounded both in lines and in bytes, and every line is cut at MAX_LINE characters,
    so one huge line or a chatty backend cannot make the babysitter's memory grow.
    """

    def __init__(self, name: str, ring_lines: int, file: RotatingLogFile | None = None,
                 ring_bytes: int = 4 << 20) -> None:
        self.name = name
        self.ring: collections.deque[LogLine] = collections.deque()
        self.ring_lines = ring_lines
        self.ring_bytes = ring_bytes
        self.bytes = 0
        self.file = file
        self._followers: set[Follower] = set()
        self._closed = False
        self._echo_log = logging.getLogger(f"infinilm_svc.backend.{name}")

    def add(self, stream: str, line: str) -> None:
        """Record one line (no trailing newline) from `stream`."""
        line = cut_line(line)
        entry = LogLine(time.time(), stream, line)
        self.ring.append(entry)
        self.bytes += len(line) + LINE_OVERHEAD
        while len(self.ring) > self.ring_lines or (self.bytes > self.ring_bytes and len(self.ring) > 1):
            self.bytes -= len(self.ring.popleft().line) + LINE_OVERHEAD
        if self.file is not None:
            try:
                self.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(entry.ts))} [{stream}] {line}\n")
            except OSError as exc:  # a full disk must not stop supervision
                log.warning("%s: cannot write the log file: %s", self.name, exc)
                self.file = None
        if self._echo_log.isEnabledFor(logging.DEBUG) or (stream == "babysitter"):
            level = logging.INFO if stream == "babysitter" else logging.DEBUG
            self._echo_log.log(level, "[%s %s] %s", self.name, stream, line)
        for f in tuple(self._followers):
            if not f.offer(entry):  # too slow to keep up: dropped, not allowed to pin memory
                self._followers.discard(f)
                log.warning("%s: a /logs follower fell more than %d bytes behind and was dropped", self.name, f.limit)

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

    def follow(self, tail: int, limit: int = FOLLOWER_BUFFER) -> tuple[list[LogLine], Follower]:
        """The last `tail` lines and a follower receiving every later one (None = the stream ends)."""
        f = Follower(limit)
        if self._closed:
            f.end()
        else:
            self._followers.add(f)
        return self.tail(tail), f

    def unfollow(self, f: Follower) -> None:
        self._followers.discard(f)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def close_followers(self) -> None:
        """End every follow stream (on shutdown)."""
        self._closed = True
        for f in tuple(self._followers):
            f.end()
        self._followers.clear()

    def close(self) -> None:
        self.close_followers()
        if self.file is not None:
            self.file.close()
            self.file = None
