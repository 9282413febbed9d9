"""A small etcd v3 client over etcd's JSON gateway (the HTTP client we already ship, no gRPC stack)."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, AsyncIterator, Sequence

import aiohttp

log = logging.getLogger(__name__)

# gRPC codes etcd answers through the gateway that mean "try again, maybe on another member".
_RETRYABLE_CODES = {4, 8, 10, 13, 14}   # deadline exceeded, exhausted, aborted, internal, unavailable
_RETRYABLE_TEXT = ("leader changed", "no leader", "timed out", "too many requests", "not capable",
                   "stopped", "unhealthy")


class EtcdUnavailable(Exception):
    """No etcd member answered the request (all endpoints down, no leader, or timed out)."""


class EtcdError(Exception):
    """etcd answered the request with an error that retrying will not fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with `prefix` (last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return b64(bytes(raw))
        raw.pop()
    return b64(b"\0")


class EtcdClient:
    """Unary calls with fail-over across `endpoints`, and a watch stream on one member at a time."""

    def __init__(self, session: aiohttp.ClientSession, endpoints: Sequence[str], *,
                 request_timeout: float = 2.0, deadline: float = 6.0) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.session = session
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.current = 0
        self.request_timeout = request_timeout
        self.deadline = deadline

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.current]

    def rotate(self, failed: str) -> None:
        """Move on from `failed` (if it is still the current endpoint) to the next one."""
        if self.endpoints[self.current] == failed and len(self.endpoints) > 1:
            self.current = (self.current + 1) % len(self.endpoints)
            log.warning("etcd member %s failed; using %s", failed, self.endpoint)

    async def call(self, path: str, body: dict, *, deadline: float | None = None) -> dict:
        """POST one request; on a member failure or a retryable answer try the next member until
        `deadline` seconds have passed, then raise EtcdUnavailable."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.deadline if deadline is None else deadline)
        last = "no attempt"
        attempt = 0
        while True:
            ep = self.endpoint
            remaining = end - loop.time()
            timeout = aiohttp.ClientTimeout(total=max(0.2, min(self.request_timeout, remaining)),
                                            sock_connect=min(0.5, self.request_timeout))
            try:
                async with self.session.post(ep + path, json=body, timeout=timeout) as resp:
                    data = await resp.json(content_type=None)
                if not isinstance(data, dict):
                    raise ValueError(f"not a JSON object: {data!r}")
                if resp.status == 200 and "error" not in data:
                    return data
                code = int(data.get("code", 0) or 0)
                message = str(data.get("message") or data.get("error") or resp.status)
                if code not in _RETRYABLE_CODES and not any(t in message for t in _RETRYABLE_TEXT):
                    raise EtcdError(code, message)
                last = f"{ep}: {message}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                last = f"{ep}: {type(exc).__name__}: {exc}"
            self.rotate(ep)
            attempt += 1
            if loop.time() >= end:
                raise EtcdUnavailable(f"no etcd member answered {path} ({', '.join(self.endpoints)}); last: {last}")
            # A full turn over the members without success: wait a little (an election takes ~1 s).
            if attempt % len(self.endpoints) == 0:
                await asyncio.sleep(min(0.1 * attempt, 0.5, max(0.0, end - loop.time())))

    # -- key-value -------------------------------------------------------------------------------
    async def range_prefix(self, prefix: str) -> tuple[int, list[dict]]:
        """Every key under `prefix`: (revision of the answer, kvs)."""
        data = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return int(data["header"]["revision"]), list(data.get("kvs") or [])

    async def get(self, key: str) -> tuple[int, dict | None]:
        data = await self.call("/v3/kv/range", {"key": b64(key)})
        kvs = data.get("kvs") or []
        return int(data["header"]["revision"]), (kvs[0] if kvs else None)

    async def txn(self, compare: list[dict], success: list[dict], failure: list[dict] | None = None) -> dict:
        return await self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []})

    # -- leases ----------------------------------------------------------------------------------
    async def grant(self, ttl: int) -> str:
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return str(data["ID"])

    async def keepalive(self, lease: str) -> int:
        """Refresh a lease once; its remaining TTL, or 0 when the lease no longer exists."""
        data = await self.call("/v3/lease/keepalive", {"ID": lease})
        result = data.get("result", data)
        return int(result.get("TTL", 0) or 0)

    async def revoke(self, lease: str) -> None:
        """Best effort: a lease left behind holds no keys and lapses by itself."""
        try:
            await self.call("/v3/lease/revoke", {"ID": lease}, deadline=1.0)
        except (EtcdError, EtcdUnavailable):
            pass

    # -- watch -----------------------------------------------------------------------------------
    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[dict]:
        """Yield watch responses for every change under `prefix` from `start_revision` on, from the
        current member; the iterator ends (or raises) when that member goes away."""
        ep = self.endpoint
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision), "progress_notify": True}}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=0.5, sock_read=None)
        # "hasleader": a member that loses its leader cancels the watch (instead of going quiet),
        # so the registry moves to a member that is still part of the quorum.
        headers = {"Grpc-Metadata-hasleader": "true"}
        try:
            async with self.session.post(ep + "/v3/watch", json=body, timeout=timeout, headers=headers) as resp:
                if resp.status != 200:
                    raise EtcdUnavailable(f"{ep}: watch answered {resp.status}")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise EtcdUnavailable(f"{ep}: watch error: {msg['error']}")
                    result = msg.get("result") or {}
                    if result.get("canceled"):
                        reason = str(result.get("cancel_reason") or "watch canceled")
                        if int(result.get("compact_revision", 0) or 0):
                            raise EtcdError(int(result["compact_revision"]), f"history compacted: {reason}")
                        raise EtcdUnavailable(f"{ep}: watch canceled: {reason}")
                    yield result
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise EtcdUnavailable(f"{ep}: watch broke: {type(exc).__name__}: {exc}") from exc


def kv_key(kv: dict) -> str:
    return unb64(kv.get("key")).decode()


def kv_json(kv: dict) -> Any:
    return json.loads(unb64(kv.get("value")) or b"null")
