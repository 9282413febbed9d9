"""The router's access log: one line per request, kept off the request's own path."""
from __future__ import annotations

import asyncio
import logging
import time

LOGGER = logging.getLogger("infinilm_svc.router.access")


class AccessLog:
    """Queues each request's fields (a tuple append) and logs the lines once per event-loop turn.

    A `logging.LogRecord` built per request costs more than the rest of the log line: its
    constructor looks up the thread, the process and the file name. Here the lines are formatted
    after the answers of that loop turn are on their way, each record is a copy of one built at
    start-up with only the message and times filled in, and when the records reach only plain
    stream handlers (the process's own set-up) each handler formats the batch and writes it once.
    Every handler still formats every record, so `--log-format json` and caplog see one record per
    request as before.
    """

    def __init__(self, logger: logging.Logger = LOGGER) -> None:
        self.logger = logger
        self.pending: list[tuple] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.proto = logging.LogRecord(logger.name, logging.INFO, __file__, 0, "", None, None).__dict__

    def add(self, rid: str, model: str, backend: str, status: int, latency: float, ttfb: float | None,
            nbytes: int, migrations: int = 0) -> None:
        """Queue one request's line (times in seconds); written when the loop next comes round."""
        pending = self.pending
        pending.append((time.time(), rid, model, backend, status, latency, ttfb, nbytes, migrations))
        if len(pending) == 1:
            loop = self.loop
            if loop is None:
                loop = self.loop = asyncio.get_running_loop()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Log every queued line, oldest first (also called at shutdown)."""
        pending = self.pending
        if not pending:
            return
        self.pending = []
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        proto = self.proto
        start = logging._startTime  # type: ignore[attr-defined]  # private (no stub): relativeCreated's origin
        records = []
        for created, rid, model, backend, status, latency, ttfb, nbytes, migrations in pending:
            record = logging.LogRecord.__new__(logging.LogRecord)
            d = record.__dict__
            d.update(proto)
            d["msg"] = (f"id={rid} model={model or '-'} backend={backend or '-'} status={status or '-'} "
                        f"latency_ms={latency * 1000:.1f} ttfb_ms={'-' if ttfb is None else f'{ttfb * 1000:.1f}'} "
                        f"bytes={nbytes}" + (f" migrated={migrations}" if migrations else ""))
            d["created"] = created
            d["msecs"] = int((created - int(created)) * 1000) + 0.0
            d["relativeCreated"] = (created - start) * 1000
            records.append(record)
        handlers = stream_handlers(logger)
        if handlers is None:
            for record in records:
                logger.handle(record)
            return
        # One write and one flush per handler for the whole batch, not one per line.
        for h in handlers:
            lines = [h.format(r) for r in records if r.levelno >= h.level and h.filter(r)]
            if lines:
                h.acquire()
                try:
                    h.stream.write(h.terminator.join(lines) + h.terminator)
                    h.flush()
                except Exception:  # noqa: BLE001 - as logging.Handler.emit does: report and carry on
                    h.handleError(records[0])
                finally:
                    h.release()


def stream_handlers(logger: logging.Logger) -> list[logging.StreamHandler] | None:
    """The handlers a record of `logger` reaches, if all are plain StreamHandlers and no filter
    is on the loggers (what `configure_logging` sets up); else None (use logger.handle)."""
    out: list[logging.StreamHandler] = []
    c: logging.Logger | None = logger
    while c is not None:
        if c.filters or c.disabled:
            return None
        for h in c.handlers:
            if type(h) is not logging.StreamHandler:
                return None
            out.append(h)
        c = c.parent if c.propagate else None
    return out or None
