"""The backend's log: a size-capped rotating file, an in-memory ring, and live followers."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from logging.handlers import RotatingFileHandler
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


class LogFile(RotatingFileHandler):
    """The backend's log file: the standard library's size-capped file, rotated to .1 .. .N.

    Two differences: with no backups (`log_backups = 0`) a full file starts afresh instead of
    growing without a cap, and a failed write is raised to the log book, which says so once and
    keeps the in-memory log (a full disk must not stop supervision), instead of a traceback on
    stderr for every write.
    """

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        super().__init__(path, maxBytes=max(0, max_bytes), backupCount=max(0, backups), encoding="utf-8",
                         errors="replace")

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding, errors=self.errors)

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called inside emit's `except`: the write's own error goes to the caller


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

    def __init__(self, name: str, ring_lines: int, file: LogFile | None = None,
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
        self.add_lines(stream, [line])

    def add_lines(self, stream: str, lines: list[str]) -> None:
        """Record lines read together from `stream`; the file gets them in one write."""
        texts = [self._take(stream, line) for line in lines]
        if self.file is None or not texts:
            return
        # One log record per batch read from the pipe, not one per line: the handler checks the
        # file's size on disk (two stats and a seek) for every record, about 0.07 ms on our test
        # machine. Per line that made a flood of short lines ten times slower to write than the
        # buffered file this replaced; per read (up to 64 KB of lines) it costs the same.
        record = logging.LogRecord(self._echo_log.name, logging.INFO, "", 0, "\n".join(texts), None, None)
        try:
            self.file.handle(record)
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot write the log file: %s", self.name, exc)
            self._close_file()

    def _take(self, stream: str, line: str) -> str:
        """Keep the line in the ring, echo it, give it to followers; its text for the file."""
        line = cut_line(line)
        entry = LogLine(time.time(), stream, line)
        self.ring.append(entry)
        self.bytes += len(line) + LINE_OVERHEAD
        while len(self.ring) > self.ring_lines or (self.bytes > self.ring_bytes and len(self.ring) > 1):
            self.bytes -= len(self.ring.popleft().line) + LINE_OVERHEAD
        if self._echo_log.isEnabledFor(logging.DEBUG) or (stream == "babysitter"):
            level = logging.INFO if stream == "babysitter" else logging.DEBUG
            self._echo_log.log(level, "[%s %s] %s", self.name, stream, line)
        for f in tuple(self._followers):
            if not f.offer(entry):  # too slow to keep up: dropped, not allowed to pin memory
                self._followers.discard(f)
                log.warning("%s: a /logs follower fell more than %d bytes behind and was dropped", self.name, f.limit)
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(entry.ts))} [{stream}] {line}"

    def marker(self, text: str) -> None:
        """A babysitter line (start, exit, restart, state change) in the backend's log."""
        self.add("babysitter", text)

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
        self._close_file()

    def _close_file(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError, ValueError):  # what is left to flush may not fit either
                file.close()
