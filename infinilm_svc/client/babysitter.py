"""A client of a babysitter's HTTP API: its backend's log (tail and live stream) and restart/stop/start."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import aiohttp

ACTIONS = ("restart", "stop", "start")


@dataclass(frozen=True)
class LogLine:
    """One line of a backend's log, as its babysitter reports it."""

    ts: float
    stream: str      # stdout, stderr, or babysitter (its own markers: started, exited, restarting)
    line: str

    @classmethod
    def from_json(cls, d: dict) -> "LogLine":
        try:
            ts = float(d.get("ts") or 0.0)
        except (TypeError, ValueError):
            ts = 0.0
        return cls(ts=ts, stream=str(d.get("stream", "stdout")), line=str(d.get("line", "")))


class BabysitterError(Exception):
    """A babysitter refused a call (its message says why) or could not be reached."""


def _message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)[:200]


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent-event stream, one event at a time."""
    data: list[str] = []
    async for raw in resp.content:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].lstrip())
        elif text == "" and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


class BabysitterClient:
    """Talks to babysitters (each call names the babysitter's URL) with a caller-owned ClientSession."""

    def __init__(self, session: aiohttp.ClientSession, token: str | None = None, timeout: float = 15.0) -> None:
        self.session = session
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def tail(self, url: str, lines: int = 200) -> list[LogLine]:
        """The last `lines` lines of the backend's log (`GET /logs?tail=N`)."""
        where = f"{url.rstrip('/')}/logs"
        try:
            async with self.session.get(where, params={"tail": str(lines)}, headers=self._headers(),
                                        timeout=self.timeout) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(body, dict) or not isinstance(body.get("lines"), list):
                    raise BabysitterError(f"GET {where} answered {resp.status}: {_message(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise BabysitterError(f"cannot read the log at {where}: {type(exc).__name__}: {exc}") from exc
        return [LogLine.from_json(e) if isinstance(e, dict) else LogLine(0.0, "stdout", str(e)) for e in body["lines"]]

    async def follow(self, url: str, tail: int = 100) -> AsyncIterator[LogLine]:
        """Lines from `GET /logs?follow=1` as they arrive; ends when the stream closes."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        where = f"{url.rstrip('/')}/logs"
        async with self.session.get(where, params={"follow": "1", "tail": str(tail)}, headers=self._headers(),
                                    timeout=timeout) as resp:
            if resp.status != 200:
                raise BabysitterError(f"GET {where} answered {resp.status}")
            async for payload in sse_events(resp):
                try:
                    d = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(d, dict):
                    yield LogLine.from_json(d)

    async def act(self, url: str, action: str) -> str:
        """POST /restart, /stop or /start; the babysitter's message (BabysitterError if refused or unreachable)."""
        if action not in ACTIONS:
            raise ValueError(action)
        try:
            async with self.session.post(f"{url.rstrip('/')}/{action}", headers=self._headers(),
                                         timeout=self.timeout) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status >= 300:
                    raise BabysitterError(f"{action} refused ({resp.status}): {_message(body)}")
                if isinstance(body, dict):
                    return str(body.get("message") or body.get("status") or "ok")
                return "ok"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise BabysitterError(f"{action}: cannot reach {url}: {type(exc).__name__} {exc}") from exc
