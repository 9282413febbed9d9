"""A client of the registry's HTTP API: register, heartbeat, deregister, list and watch."""
from __future__ import annotations

import asyncio
import json as json_module
import logging
import time
from typing import Any, Sequence

import aiohttp

log = logging.getLogger(__name__)


_SERVICES_OPENING = '{"services":['
_RECORDS_PER_SLICE = 250


async def records_in_slices(text: str) -> list[dict]:
    """The records of a GET /services answer, decoded one record at a time with the event loop
    free every 250 records: 10,000 records are 2.5 MB of JSON, 40-80 ms of parsing on a small
    machine in one call. An answer of another shape is decoded whole."""
    if not text.startswith(_SERVICES_OPENING):
        body = json_module.loads(text)
        return list(body.get("services", [])) if isinstance(body, dict) else []
    decode = json_module.JSONDecoder().raw_decode
    out: list[dict] = []
    pos = len(_SERVICES_OPENING)
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n:
            raise ValueError("the services list is cut short")
        if text[pos] == "]":
            return out
        record, pos = decode(text, pos)
        out.append(record)
        if len(out) % _RECORDS_PER_SLICE == 0:
            await asyncio.sleep(0)


class RegistryUnavailable(Exception):
    """The registry could not be reached, or answered with a server error."""


class RegistryRejected(Exception):
    """The registry answered a 4xx other than 404 (bad record, missing token, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"registry answered {status}: {message}")
        self.status = status


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        if err is not None:
            return str(err)
    return str(body)[:200]


def registry_urls(value: str | Sequence[str] | None) -> list[str]:
    """Registry URLs from a string (comma-separated) or a list; empty items are dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [u for v in value for u in str(v).split(",")]
    return [u.strip().rstrip("/") for u in items if u.strip()]


# How long to wait for a registry's TCP handshake before moving on to the next one.
CONNECT_TIMEOUT = 0.5


class RegistryClient:
    """Talks to a registry with a caller-owned ClientSession; fails over along a list of registries.

    A call that cannot reach the current registry (or gets a 5xx) moves to the next URL at once
    and tries there; the client stays on whichever registry answered last.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str | Sequence[str], token: str | None = None,
                 timeout: float = 10.0) -> None:
        self.session = session
        self.urls = registry_urls(url) or [""]
        self.current = 0
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(CONNECT_TIMEOUT, timeout))
        self.failovers = 0
        self.last_failover: dict[str, Any] | None = None
        self.heartbeat_ttl: float | None = None   # as the registry last told it (register/heartbeat answers)
        self.epoch: str | None = None     # X-Registry-Epoch of the last answer: the table's identity

    @property
    def url(self) -> str:
        """The registry this client talks to now."""
        return self.urls[self.current]

    def _fail_over(self, failed: str, reason: str) -> None:
        if len(self.urls) < 2 or self.url != failed:
            return
        self.current = (self.current + 1) % len(self.urls)
        self.failovers += 1
        self.last_failover = {"from": failed, "to": self.url, "reason": reason, "at": time.time()}
        log.warning("registry %s failed (%s); moving to %s", failed, reason, self.url)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                    timeout: aiohttp.ClientTimeout | None = None,
                    headers: dict[str, str] | None = None, raw: bool = False) -> tuple[int, Any, Any]:
        """One request; on a transport error or a 5xx, the same request on each other registry."""
        errors = []
        for _ in range(len(self.urls)):
            url = self.url
            try:
                status, body, answer_headers = await self._call_one(url, method, path, json, params, timeout, headers,
                                                                    raw)
            except RegistryUnavailable as exc:
                errors.append(str(exc))
                self._fail_over(url, str(exc))
                continue
            if status >= 500 and len(self.urls) > 1:
                errors.append(f"{url} answered {status}: {_error_text(body)}")
                self._fail_over(url, errors[-1])
                continue
            return status, body, answer_headers
        if len(errors) == 1 or len(self.urls) == 1:
            raise RegistryUnavailable(errors[-1])
        raise RegistryUnavailable("no registry answered: " + "; ".join(errors))

    async def _call_one(self, url: str, method: str, path: str, json: Any, params: dict | None,
                        timeout: aiohttp.ClientTimeout | None,
                        headers: dict[str, str] | None = None, raw: bool = False) -> tuple[int, Any, Any]:
        sent = self._headers()
        if headers:
            sent.update(headers)
        try:
            async with self.session.request(method, url + path, json=json, params=params,
                                            headers=sent, timeout=timeout or self.timeout) as resp:
                try:
                    body = await resp.text() if raw else await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    body = None
                self.epoch = resp.headers.get("X-Registry-Epoch", self.epoch)
                return resp.status, body, resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise RegistryUnavailable(f"{method} {url}{path}: {type(exc).__name__}: {exc}") from exc

    def _raise_for(self, status: int, body: Any) -> None:
        if status >= 500:
            raise RegistryUnavailable(f"registry answered {status}: {_error_text(body)}")
        if status >= 400:
            raise RegistryRejected(status, _error_text(body))

    async def register(self, record: dict) -> dict:
        """POST /services; returns the stored record."""
        status, body, _ = await self._call("POST", "/services", json=record)
        self._raise_for(status, body)
        self._note_ttl(body)
        return body.get("service", {}) if isinstance(body, dict) else {}

    def _note_ttl(self, body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("heartbeat_ttl"), (int, float)):
            self.heartbeat_ttl = float(body["heartbeat_ttl"])

    async def heartbeat(self, name: str, status: str | None = None, metadata: dict | None = None) -> bool:
        """POST /services/{name}/heartbeat; False when the registry does not know the name."""
        return await self.beat(name, status, metadata) is not None

    async def beat(self, name: str, status: str | None = None, metadata: dict | None = None) -> dict | None:
        """POST /services/{name}/heartbeat; the record as the registry holds it ({} from a registry
        that does not say), or None when it does not know the name."""
        payload: dict[str, Any] = {}
        if status is not None:
            payload["status"] = status
        if metadata is not None:
            payload["metadata"] = metadata
        code, body, _ = await self._call("POST", f"/services/{name}/heartbeat", json=payload or None)
        if code == 404:
            return None
        self._raise_for(code, body)
        self._note_ttl(body)
        held = body.get("service") if isinstance(body, dict) else None
        return held if isinstance(held, dict) else {}

    async def deregister(self, name: str) -> bool:
        """DELETE /services/{name}; False when it was not registered."""
        code, body, _ = await self._call("DELETE", f"/services/{name}")
        if code == 404:
            return False
        self._raise_for(code, body)
        return True

    async def get(self, name: str) -> dict | None:
        code, body, _ = await self._call("GET", f"/services/{name}")
        if code == 404:
            return None
        self._raise_for(code, body)
        return body

    async def services(self, *, healthy: bool | None = None, status: str | None = None,
                       index: int | None = None, wait: float | None = None) -> tuple[list[dict], int]:
        """GET /services; with `index` and `wait` it blocks until the table changes past `index`.

        Returns the records and the registry's index (X-Registry-Index).
        """
        params: dict[str, str] = {}
        if healthy is not None:
            params["healthy"] = "true" if healthy else "false"
        if status is not None:
            params["status"] = status
        timeout = None
        if index is not None:
            params["index"] = str(index)
            if wait is not None:
                params["wait"] = f"{wait:g}s"
                timeout = aiohttp.ClientTimeout(total=wait + (self.timeout.total or 0),
                                                sock_connect=self.timeout.sock_connect)
        code, body, headers = await self._call("GET", "/services", params=params, timeout=timeout)
        self._raise_for(code, body)
        try:
            idx = int(headers.get("X-Registry-Index", "0"))
        except ValueError:
            idx = 0
        return list(body.get("services", [])) if isinstance(body, dict) else [], idx

    async def watch_services(self, index: int, wait: float | None,
                             etag: str | None = None) -> tuple[list[dict] | None, int, str | None]:
        """GET /services?index=&wait= for a watcher that keeps the table it got last: with the
        `etag` of that answer, an unchanged table comes back as None (304, no body) rather than
        every record again. Returns (records or None, index, etag of this answer)."""
        params = {"index": str(index)}
        timeout = None
        if wait is not None:
            params["wait"] = f"{wait:g}s"
            timeout = aiohttp.ClientTimeout(total=wait + (self.timeout.total or 0),
                                            sock_connect=self.timeout.sock_connect)
        code, body, headers = await self._call("GET", "/services", params=params, timeout=timeout,
                                               headers={"If-None-Match": etag} if etag else None, raw=True)
        try:
            idx = int(headers.get("X-Registry-Index", "0"))
        except ValueError:
            idx = 0
        if code == 304:
            return None, idx, etag
        if code >= 400:
            try:
                body = json_module.loads(body)
            except ValueError:
                pass
            self._raise_for(code, body)
        return await records_in_slices(body or "{}"), idx, headers.get("ETag")

    async def wait_epoch(self, wait: float) -> dict | None:
        """GET /epoch?wait=: answers when `wait` ends or the registry shuts down; None if it has no /epoch."""
        timeout = aiohttp.ClientTimeout(total=wait + (self.timeout.total or 0), sock_connect=self.timeout.sock_connect)
        code, body, _ = await self._call("GET", "/epoch", params={"wait": f"{wait:g}s"}, timeout=timeout)
        if code == 404:
            return None
        self._raise_for(code, body)
        return body if isinstance(body, dict) else {}

    async def health(self) -> dict:
        code, body, _ = await self._call("GET", "/health")
        self._raise_for(code, body)
        return body
