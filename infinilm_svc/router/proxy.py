"""The forwarding path: choose a backend, retry before the first byte, relay answers and streams."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from itertools import count
from typing import Any

from aiohttp import web

from ..config.router import RouterConfig
from ..errors import ApiError, error_body, parse_json_object
from .access import AccessLog
from .balancer import Route
from .health import Health
from .stats import usage_of
from .table import CLOSED, Backend, Table
from .upstream import ConnectFailed, Pool, Response, UpstreamBroken, UpstreamTimeout

log = logging.getLogger(__name__)

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                          "/v1/embeddings", "/embeddings"})
# Request headers passed to backends (an allow-list; the client's Authorization never is).
FORWARD_HEADERS = ("Content-Type", "Accept", "User-Agent", "Accept-Language", "OpenAI-Organization",
                   "OpenAI-Project", "Traceparent", "Tracestate")
# Response headers never copied back (hop-by-hop, or recomputed by the server).
DROP_RESPONSE = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                           "trailer", "trailers", "transfer-encoding", "upgrade", "content-length", "date",
                           "server"})
RETRY_STATUSES = frozenset({502, 503, 504})


def content_texts(content: Any) -> list[str]:
    """The text pieces of one message's `content`: a string, or a list of parts with `text`/`content`."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [v for p in content if isinstance(p, dict) for k in ("text", "content")
            if isinstance(v := p.get(k), str)]


def message_text(data: dict) -> str | None:
    """The prompt text of a chat or completion request (for prefix matching), or None."""
    msgs = data.get("messages")
    if isinstance(msgs, list):
        parts = []
        for m in msgs:
            if isinstance(m, dict):
                parts.extend(content_texts(m.get("content")))
                parts.append("\x1e")  # message boundary
        return "".join(parts)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\x1e".join(prompt)
    return None


def message_size(data: dict) -> int:
    """UTF-8 bytes of message text (upstream's cache-type routing measure), not the body size."""
    msgs = data.get("messages")
    if isinstance(msgs, list):
        return sum(len(t.encode()) for m in msgs if isinstance(m, dict) for t in content_texts(m.get("content")))
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.encode())
    if isinstance(prompt, list):
        return sum(len(p.encode()) for p in prompt if isinstance(p, str))
    return 0


class Upstream(Exception):
    """An attempt failed before anything reached the client."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Proxy:
    """Forwards client requests to backends chosen by the table's policies."""

    def __init__(self, config: RouterConfig, table: Table, health: Health) -> None:
        self.config = config
        self.table = table
        self.health = health
        self.pool: Pool | None = None
        self.keys = frozenset(f"Bearer {k}" for k in config.api_keys) if config.api_keys else None
        self.attempts = config.retries + 1
        self.id_prefix = os.urandom(4).hex()
        self.ids = count(1)
        self.threshold = config.cache_type_threshold
        self.session_header = config.session_header
        self.loop: asyncio.AbstractEventLoop | None = None
        self.access = AccessLog() if config.access_log else None

    def check_key(self, request: web.Request) -> None:
        if self.keys is not None and request.headers.get("Authorization") not in self.keys:
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", "invalid_api_key")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every proxied path: route by model and policy, forward, relay."""
        rid = request.headers.get("X-Request-ID") or f"{self.id_prefix}-{next(self.ids):x}"
        try:
            return await self._forward(request, rid)
        except ApiError as exc:
            # The router's own error answers carry the request id too.
            exc.headers = {**exc.headers, "X-Request-ID": rid} if exc.headers else {"X-Request-ID": rid}
            raise
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body too large (limit {self.config.max_body} bytes)",
                           code="body_too_large", headers={"X-Request-ID": rid}) from None

    async def _forward(self, request: web.Request, rid: str) -> web.StreamResponse:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self.keys is not None:
            self.check_key(request)
        rh = request.headers
        body = await request.read() if request.body_exists else b""
        path = request.raw_path
        data: Any = None
        model = ""
        if body and (path.partition("?")[0] in OPENAI_PATHS or "json" in rh.get("Content-Type", "")):
            data = parse_json_object(body)
            m = data.get("model")
            if m is not None:
                if not isinstance(m, str):
                    raise ApiError(400, "'model' must be a string", code="invalid_model")
                model = m
        t = self.table
        if model and model not in t.known_models:
            if t.backends:
                raise ApiError(404, f"The model '{model}' does not exist or is not served here",
                               "invalid_request_error", "model_not_found")
            raise ApiError(503, "no backends are known yet", "server_error", "no_backends",
                           headers={"Retry-After": "2"})
        group = t.groups.get((model, None))
        if group is None:
            raise ApiError(503, "no backends are known yet", "server_error", "no_backends",
                           headers={"Retry-After": "2"})
        if data is not None and model in t.pooled_models:
            pool = t.groups.get((model, "static" if message_size(data) > self.threshold else "paged"))
            if pool is not None and pool.backends:
                group = pool
        mstats = t.model_stats[model]
        route = Route(model)
        policy = group.policy
        pname = policy.name
        if pname == "session":
            key = None
            if data is not None:
                key = data.get("prompt_cache_key")
            if not isinstance(key, str) or not key:
                key = rh.get(self.session_header)
                if not key and data is not None:
                    u = data.get("user")
                    key = u if isinstance(u, str) and u else None
            route.session_key = key
            route.in_flight = mstats.in_flight
        elif pname == "cache_aware" and data is not None:
            route.text = message_text(data)

        headers = {"X-Request-ID": rid, "Accept-Encoding": rh.get("Accept-Encoding", "identity")}
        for name in FORWARD_HEADERS:
            v = rh.get(name)
            if v is not None:
                headers[name] = v
        pool = self.pool
        assert pool is not None
        method = request.method
        mstats.request_count += 1
        mstats.in_flight += 1
        exclude: list[Backend] = []
        fallback: web.Response | None = None
        failure: Upstream | None = None
        b: Backend | None = None
        status = 0
        nbytes = 0
        ttfb: float | None = None
        try:
            for attempt in range(self.attempts):
                if attempt:
                    await asyncio.sleep(self.config.retry_backoff * (1 << (attempt - 1)) * (0.5 + random.random()))
                b = policy.pick(group, route, exclude)
                if b is None:
                    break
                bs = b.stats
                if self.config.max_in_flight:
                    await self._acquire(b)
                else:
                    bs.in_flight += 1
                bs.request_count += 1
                if b.circuit is not CLOSED:
                    self.health.trial_started(b)
                resp = None
                try:
                    try:
                        resp = await pool.request(
                            b.url, method, path,
                            {**headers, **b.auth_headers} if b.auth_headers else headers, body)
                        status = resp.status
                        if resp.streaming:
                            out = await self._relay_stream(request, resp, b, mstats, rid, t0)
                            ttfb = out[1]
                            nbytes = out[2]
                            return out[0]
                        payload = await resp.read()
                    except UpstreamTimeout as exc:
                        raise Upstream("timeout", f"backend {b.name}: {exc}") from None
                    except ConnectFailed as exc:
                        raise Upstream("connect", f"backend {b.name}: {exc}") from None
                    except UpstreamBroken as exc:
                        raise Upstream("upstream_io", f"backend {b.name}: {exc}") from None
                    ttfb = loop.time() - t0
                    nbytes = len(payload)
                    answer = web.Response(body=payload, status=status,
                                          headers=self._response_headers(resp, rid, b))
                    if status >= 500:
                        self.health.record_failure(b)
                        bs.error(f"http_{status}", payload[:200].decode(errors="replace"), loop.time())
                        if status in RETRY_STATUSES and attempt + 1 < self.attempts:
                            exclude.append(b)
                            fallback = answer
                            continue
                    else:
                        if b.circuit_failures or b.circuit is not CLOSED:
                            self.health.record_success(b)
                        if payload:
                            usage = usage_of(payload)
                            if usage is not None:
                                bs.add_tokens(usage)
                                mstats.add_tokens(usage)
                    bs.latency.add(ttfb)
                    bs.ttft.add(ttfb)
                    mstats.latency.add(ttfb)
                    mstats.ttft.add(ttfb)
                    if status >= 500:
                        mstats.error(f"http_{status}", f"backend {b.name} answered {status}", loop.time())
                    return answer
                except Upstream as exc:
                    failure = exc
                    bs.error(exc.kind, exc.message, loop.time())
                    self.health.record_failure(b)
                    exclude.append(b)
                    if exc.kind == "timeout" and not self.config.retry_on_timeout:
                        break
                finally:
                    if resp is not None:
                        resp.release()
                    self._release(b)
                    if b.trial:
                        self.health.trial_abandoned(b)
            if fallback is not None:
                status = fallback.status
                mstats.error(f"http_{status}", "every backend tried answered 5xx", loop.time())
                return fallback
            if failure is None:
                status = 503
                raise ApiError(503, f"no healthy backend serves model '{model}'" if model else
                               "No healthy services available", "server_error", "no_healthy_backend",
                               headers={"Retry-After": "2"})
            mstats.error(failure.kind, failure.message, loop.time())
            if failure.kind == "timeout":
                status = 504
                raise ApiError(504, f"Service timeout: {failure.message}", "server_error", "upstream_timeout")
            if failure.kind == "connect":
                status = 503
                raise ApiError(503, f"Service unavailable - connection refused: {failure.message}", "server_error",
                               "upstream_unavailable", headers={"Retry-After": "2"})
            status = 502
            raise ApiError(502, f"Bad gateway - error communicating with service: {failure.message}",
                           "server_error", "bad_gateway")
        finally:
            mstats.in_flight -= 1
            if self.access is not None:
                self.access.add(rid, model, b.name if b else "", status, loop.time() - t0, ttfb, nbytes)

    def _response_headers(self, resp: Response, rid: str, b: Backend) -> dict[str, str]:
        out = {k: v for k, v in resp.headers if k.lower() not in DROP_RESPONSE}
        out["X-Request-ID"] = rid
        out["X-InfiniLM-Backend"] = b.name
        return out

    async def _relay_stream(self, request: web.Request, resp: Response, b: Backend,
                            mstats: Any, rid: str, t0: float) -> tuple[web.StreamResponse, float | None, int]:
        """Relay an SSE answer as it arrives; once headers are out there are no more retries."""
        loop = asyncio.get_running_loop()
        bs = b.stats
        out = web.StreamResponse(status=resp.status, headers=self._response_headers(resp, rid, b))
        if resp.status >= 500:
            self.health.record_failure(b)
        elif b.circuit_failures or b.circuit is not CLOSED:
            self.health.record_success(b)
        try:
            await out.prepare(request)
        except (ConnectionResetError, OSError):
            bs.error("client_disconnect", "client went away", loop.time())
            resp.close()
            return out, None, 0
        ttfb = None
        nbytes = 0
        tail = b"\n\n"
        try:
            while True:
                try:
                    chunk = await resp.readany()
                except (UpstreamBroken, UpstreamTimeout) as exc:
                    kind = "timeout" if isinstance(exc, UpstreamTimeout) else "stream_broken"
                    msg = f"backend {b.name} failed mid-stream: {type(exc).__name__}: {exc}".rstrip(": ")
                    bs.error(kind, msg, loop.time())
                    mstats.error(kind, msg, loop.time())
                    self.health.record_failure(b)
                    sep = b"" if tail.endswith(b"\n\n") else (b"\n" if tail.endswith(b"\n") else b"\n\n")
                    event = sep + b"data: " + json.dumps(error_body(msg, "server_error", "upstream_stream_error")).encode() + b"\n\n"
                    try:
                        await out.write(event)
                        await out.write_eof()
                    except (ConnectionResetError, OSError):
                        pass
                    resp.close()
                    break
                if not chunk:
                    try:
                        await out.write_eof()
                    except (ConnectionResetError, OSError):
                        pass
                    break
                if ttfb is None:
                    ttfb = loop.time() - t0
                    bs.ttft.add(ttfb)
                    mstats.ttft.add(ttfb)
                try:
                    await out.write(chunk)
                except (ConnectionResetError, OSError):
                    # The client went away: drop the backend connection so generation stops.
                    bs.error("client_disconnect", "client went away mid-stream", loop.time())
                    resp.close()
                    break
                nbytes += len(chunk)
                tail = chunk
                if b'"usage"' in chunk:
                    usage = usage_of(chunk)
                    bs.add_tokens(usage)
                    mstats.add_tokens(usage)
        except asyncio.CancelledError:
            # The server cancels the handler when the client goes away (handler_cancellation).
            bs.error("client_disconnect", "client went away mid-stream", loop.time())
            resp.close()
            raise
        lat = loop.time() - t0
        bs.latency.add(lat)
        mstats.latency.add(lat)
        return out, ttfb, nbytes

    async def _acquire(self, b: Backend) -> None:
        """Take one of `b`'s max_in_flight slots, waiting in its bounded queue if needed."""
        bs = b.stats
        if bs.in_flight < self.config.max_in_flight:
            bs.in_flight += 1
            return
        if len(b.waiters) >= self.config.queue_size:
            bs.error("queue_full", "queue full", asyncio.get_running_loop().time())
            raise ApiError(429, f"backend {b.name} is at its limit of {self.config.max_in_flight} requests "
                                f"and its queue is full", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        b.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, self.config.queue_timeout)
        except asyncio.TimeoutError:
            bs.error("queue_timeout", "queue timeout", asyncio.get_running_loop().time())
            raise ApiError(503, f"backend {b.name} stayed busy for {self.config.queue_timeout:g}s",
                           "server_error", "queue_timeout", headers={"Retry-After": "1"}) from None
        finally:
            if fut in b.waiters:
                b.waiters.remove(fut)

    def _release(self, b: Backend) -> None:
        bs = b.stats
        bs.in_flight -= 1
        waiters = b.waiters
        while waiters:
            fut = waiters.pop(0)
            if not fut.done():
                bs.in_flight += 1  # the slot passes straight to the waiter
                fut.set_result(None)
                break
