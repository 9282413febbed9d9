"""The forwarding path: admit a request, pick a backend, attempt (with retries), relay the answer."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from itertools import count
from time import perf_counter
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http import StreamWriter

from ..auth import KeyRing, bearer_token
from ..config.router import RouterConfig
from ..errors import ApiError, error_body, parse_json_object
from ..wire import dumps
from .access import AccessLog
from .assembly import Assembler, StreamError, stream_body
from .balancer import Route
from .failures import (
    BackendHung,
    ConnectError,
    ConnectionBroken,
    ProtocolError,
    ReadTimeout,
    StreamErrorEvent,
    TransportError,
)
from .health import Health
from .kvmodel import Placement
from .migration import Transcript, continuation, migratable
from .pool import Pool
from .prompt import content_texts
from .queueing import Ask, QueueFull, QueueTimeout, Scheduler, classify, request_key
from .reply import Reply
from .stats import Counters, usage_of
from .table import Backend, Group, Table

log = logging.getLogger(__name__)

OPENAI_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
                          "/v1/embeddings", "/embeddings"})
# Request headers passed to backends, by lower-case name (an allow-list: the client's Authorization
# never is). They are forwarded as the client's own bytes, never decoded and re-encoded.
FORWARD_HEADERS = frozenset({b"content-type", b"accept", b"accept-encoding", b"user-agent", b"accept-language",
                             b"openai-organization", b"openai-project", b"traceparent", b"tracestate"})
# Response headers never copied back (hop-by-hop, or recomputed by the server).
DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                           b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"date",
                           b"server"})
RETRY_STATUSES = frozenset({502, 503, 504})
# Requests whose non-streamed answer is assembled from a stream (stream_upstream).
ASSEMBLED_PATHS = frozenset({"/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions"})
_CLIENT_HIGH_WATER = 1 << 18   # bytes queued for a streaming client before we wait for it to read


def with_slot(body: bytes, slot: int) -> bytes | None:
    """The request body with `"id_slot": slot` added (llama-server's field for the slot to run a
    request in), by splicing the bytes rather than re-encoding the JSON; None when the body does not
    start with an ASCII `{` (another encoding, a byte-order mark), which is then sent as it is."""
    text = body.lstrip()
    if text[:1] != b"{":
        return None
    rest = text[1:]
    return b'{"id_slot":%d%s%s' % (slot, b"" if rest.lstrip()[:1] == b"}" else b",", rest)


def absorbed(ex: "Exchange") -> None:
    """The client got its answer: the failures on the way were absorbed (retried or migrated)."""
    for c in ex.failed:
        c.absorbed += 1
    ex.failed.clear()


def endpoint_of(path: str) -> str:
    """The OpenAI endpoint of a request path: without its query, always with /v1."""
    p = path.partition("?")[0]
    return p if p.startswith("/v1/") else "/v1" + p


def slot_refused(status: int, payload: bytes) -> bool:
    """An engine's answer that says it does not take the slot field (OpenAI-style strict servers
    answer 400 "Unrecognized request argument supplied: id_slot")."""
    return status in (400, 422) and b"id_slot" in payload


class Failure(NamedTuple):
    """How one kind of transport error is answered, retried and counted."""

    kind: str             # stats kind before the first byte reached the client
    stream_kind: str      # stats kind once a stream is under way
    status: int
    code: str
    message: str
    retry: bool | None    # None: as `retry_on_timeout` says


# The one table mapping transport errors to status, retry decision and stats kind.
FAILURES: dict[type[TransportError], Failure] = {
    ConnectError: Failure("connect", "connect", 503, "upstream_unavailable",
                          "Service unavailable - connection refused", True),
    ReadTimeout: Failure("timeout", "timeout", 504, "upstream_timeout", "Service timeout", None),
    ConnectionBroken: Failure("upstream_io", "stream_broken", 502, "bad_gateway",
                              "Bad gateway - error communicating with service", True),
    ProtocolError: Failure("upstream_protocol", "upstream_protocol", 502, "upstream_protocol",
                           "Bad gateway - malformed answer from the backend", True),
    BackendHung: Failure("hung", "hung", 503, "upstream_unavailable",
                         "Service unavailable - the backend stopped answering", True),
    StreamErrorEvent: Failure("stream_error_event", "stream_error_event", 502, "bad_gateway",
                              "Bad gateway - the backend reported an error", True),
}


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


class Exchange:
    """What one request did, for the access log and the statistics (filled in as it goes)."""

    __slots__ = ("rid", "model", "backend", "status", "t0", "ttfb", "nbytes", "migrations", "started", "sent",
                 "answered", "tried", "failed", "ask", "tokens")

    def __init__(self, rid: str, t0: float) -> None:
        self.rid = rid
        self.model = ""
        self.backend = ""
        self.status = 0
        self.t0 = t0
        self.ttfb: float | None = None
        self.nbytes = 0
        self.migrations = 0
        # perf_counter times (the loop's clock may not move within one turn of the loop):
        self.started = perf_counter()   # when the handler began
        self.sent = 0.0                 # when the request that answered went to its backend
        self.answered = 0.0             # when that backend's head was in
        self.tried = t0                 # loop time the current backend was asked (its own figures start here)
        self.failed: list[Counters] = []   # backends that failed this request (absorbed if it succeeds)
        self.ask: Ask | None = None         # its place in its model's queue
        self.tokens: int | None = None      # what the engine said it cost (usage)


class Admitted(NamedTuple):
    """A request that passed admission: its body, parsed JSON (if any), model and backend group."""

    body: bytes
    data: dict | None
    model: str
    group: Group
    headers: bytes        # header lines forwarded to the backend
    path: str             # the request's path and query, as sent
    rank: int             # its class (queueing.CLASSES)
    tenant: str           # whose work it is, for fair shares
    upstream: bytes       # the body the engine is sent (a stream, when the answer is assembled)
    assemble: bool        # a non-streamed answer built here from the engine's stream


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class StreamRelay:
    """Writes a backend's streamed body to the client as it arrives (the reply's sink)."""

    __slots__ = ("transport", "chunked", "writer", "ex", "loop", "gone", "done_seen", "counters", "transcript",
                 "placement")

    def __init__(self, transport: asyncio.Transport, chunked: bool, writer: Any, ex: Exchange,
                 loop: asyncio.AbstractEventLoop, counters: tuple[Counters, Counters],
                 transcript: Transcript | None) -> None:
        self.transport = transport
        self.chunked = chunked
        self.writer = writer
        self.ex = ex
        self.loop = loop
        self.gone = False
        self.done_seen = False
        self.counters = counters
        self.transcript = transcript   # set when the stream may migrate: whole events only, kept
        self.placement: Placement | None = None   # the cache model's placement, told of the answer

    def __call__(self, data: bytes) -> bool:
        t = self.transport
        if t.is_closing():
            self.gone = True
            return True
        transcript = self.transcript
        if transcript is not None:
            data = transcript.take(data)
            if transcript.error_event:
                if data:
                    self._send(t, data)
                return True           # wakes the relay, whose drain reports the failure
            if not data:
                return False
        return self._send(t, data)

    def _send(self, t: asyncio.Transport, data: bytes) -> bool:
        ex = self.ex
        pl = self.placement
        if pl is not None:
            if pl.first_at is None:
                pl.first_byte()
            if b'"timings"' in data or b'"cached_tokens"' in data:
                pl.observe(data)
        if ex.ttfb is None:
            now = self.loop.time()
            ex.ttfb = ttfb = now - ex.t0
            backend, model = self.counters
            backend.ttft.add(now - ex.tried)      # the backend's own; the client's wait is the model's
            model.ttft.add(ttfb)
        t.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        ex.nbytes += len(data)
        if b"[DONE]" in data:
            self.done_seen = True
        if b'"usage"' in data:
            usage = usage_of(data)
            if usage is not None:
                for c in self.counters:
                    c.add_tokens(usage)
                ex.tokens = usage[0] + usage[1]
        return t.get_write_buffer_size() > _CLIENT_HIGH_WATER

    async def drain(self) -> None:
        if self.gone or self.transport.is_closing():
            raise ClientGone()
        if self.transcript is not None and self.transcript.error_event:
            raise StreamErrorEvent("the backend sent an error event mid-stream")
        await self.writer.drain()


class Proxy:
    """Forwards client requests to backends chosen by the table's policies."""

    def __init__(self, config: RouterConfig, table: Table, health: Health, pool: Pool,
                 scheduler: Scheduler) -> None:
        self.config = config
        self.table = table
        self.health = health
        self.pool = pool
        self.scheduler = scheduler
        self.keys = KeyRing(config.api_keys) if config.api_keys else None
        self.promoters = KeyRing(config.priority_keys)    # keys that may ask for priority
        self.attempts = config.retries + 1
        self.id_prefix = os.urandom(4).hex()
        self.ids = count(1)
        self.threshold = config.cache_type_threshold
        self.access = AccessLog() if config.access_log else None

    def check_key(self, request: web.BaseRequest) -> None:
        """Clients need one of `api_keys` when any are set (any-case scheme, constant-time compare)."""
        if self.keys is not None and not self.keys.allows(request.headers.get("Authorization")):
            raise ApiError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", "invalid_api_key")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every proxied path: admit, pick, attempt, relay; errors carry the request id."""
        loop = asyncio.get_running_loop()
        rid = request.headers.get("X-Request-ID", "")
        if not rid or len(rid) > 200 or not rid.isascii() or not rid.isprintable():
            rid = f"{self.id_prefix}-{next(self.ids):x}"
        ex = Exchange(rid, loop.time())
        try:
            return await self._forward(request, ex)
        except ApiError as exc:
            ex.status = exc.status
            exc.headers = {**exc.headers, "X-Request-ID": rid} if exc.headers else {"X-Request-ID": rid}
            raise
        except web.HTTPRequestEntityTooLarge:
            ex.status = 413
            raise ApiError(413, f"request body too large (limit {self.config.max_body} bytes)",
                           code="body_too_large", headers={"X-Request-ID": rid}) from None
        finally:
            if self.access is not None:
                self.access.add(rid, ex.model, ex.backend, ex.status, loop.time() - ex.t0, ex.ttfb, ex.nbytes,
                                ex.migrations)

    async def _forward(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse:
        adm = await self._admit(request, ex)
        route = Route(adm.model)
        mstats = self.table.model_stats[adm.model]
        adm.group.policy.prepare(route, adm.data, request.headers, mstats.in_flight)
        mstats.request_count += 1
        mstats.in_flight += 1
        limit = adm.data.get("max_tokens") if adm.data is not None else None
        cost = len(adm.body) / 4 + (limit if isinstance(limit, int) and not isinstance(limit, bool) else 256)
        ex.ask = self.scheduler.queue(adm.group).ask(adm.tenant, adm.rank, cost)
        try:
            return await self._attempt(request, adm, route, mstats, ex)
        finally:
            mstats.in_flight -= 1
            ex.ask.finished(ex.tokens)

    # -- admit: auth, body, model, group -------------------------------------------------------------
    async def _admit(self, request: web.BaseRequest, ex: Exchange) -> Admitted:
        if self.keys is not None:
            self.check_key(request)
        body = await request.read() if request.body_exists else b""
        path = request.raw_path
        data: dict | None = None
        model = ""
        if body and (path.partition("?")[0] in OPENAI_PATHS or "json" in request.headers.get("Content-Type", "")):
            data = parse_json_object(body)
            m = data.get("model")
            if m is not None:
                if not isinstance(m, str):
                    raise ApiError(400, "'model' must be a string", code="invalid_model")
                model = m
        ex.model = model
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
            pooled = t.groups.get((model, "static" if message_size(data) > self.threshold else "paged"))
            if pooled is not None and pooled.backends:
                group = pooled
        lines = [b"X-Request-ID: ", ex.rid.encode(), b"\r\n"]
        encoding = False
        for name, value in request.raw_headers:
            n = name.lower()
            if n in FORWARD_HEADERS:
                lines += (name, b": ", value, b"\r\n")
                encoding = encoding or n == b"accept-encoding"
        if not encoding:
            lines.append(b"Accept-Encoding: identity\r\n")
        token = bearer_token(request.headers.get("Authorization")) if self.keys is not None else None
        rank, tenant = classify(data, request.headers, token, self.config,
                                token is None or (bool(self.config.priority_keys)
                                                  and self.promoters.allows(request.headers.get("Authorization"))))
        assemble = (data is not None and path.partition("?")[0] in ASSEMBLED_PATHS and not data.get("stream")
                    and self.config.stream_upstream_models.get(model, self.config.stream_upstream))
        return Admitted(body, data, model, group, b"".join(lines), path, rank, tenant,
                        stream_body(data) if assemble and data is not None else body, assemble)

    # -- attempt: pick, send, retry before the first byte ------------------------------------------------
    async def _attempt(self, request: web.BaseRequest, adm: Admitted, route: Route, mstats: Counters,
                       ex: Exchange) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        config = self.config
        method = request.method.encode()
        path = adm.path.encode()
        policy = adm.group.policy
        exclude: list[Backend] = []
        fallback: web.Response | None = None
        failure: tuple[Failure, str] | None = None
        endpoint = endpoint_of(adm.path)
        lacking: list[str] = []       # backends that do not serve this endpoint (501, now or before)
        attempt = 0                   # attempts that failed (an endpoint a backend lacks is not one)
        backoff = False
        while attempt < self.attempts:
            if backoff:                    # after a failure, not after a backend that lacks the endpoint
                backoff = False
                await asyncio.sleep(config.retry_backoff * (1 << (attempt - 1)) * (0.5 + random.random()))
            b = policy.pick(adm.group, route, exclude)
            while b is not None and endpoint in b.lacks:     # known not to serve it: not asked again
                exclude.append(b)
                lacking.append(b.name)
                b = policy.pick(adm.group, route, exclude)
            if b is None:
                break
            b = await self._place(adm, route, ex, b, exclude)
            ask = ex.ask
            assert ask is not None
            if not ask.started:
                ask.queue.started(ask)
            bs = b.stats
            ex.backend = b.name
            bs.request_count += 1
            b.circuit.started()
            reply: Reply | None = None
            pl = route.placement
            try:
                headers = adm.headers + b.auth_lines if b.auth_lines else adm.headers
                ex.tried = loop.time()
                ex.sent = perf_counter()
                reply, payload = await self._send(b, pl, method, path, headers, adm.upstream)
                ex.answered = perf_counter()
                ex.status = reply.status
                if reply.streaming and adm.assemble and reply.status == 200:
                    payload = await self._gather(reply, pl, path, b, mstats, ex)
                elif reply.streaming:
                    return await self._relay(request, adm, route, reply, b, mstats, ex, exclude)
                if payload is None:
                    payload = await reply.read()
                if pl is not None and reply.status < 400:
                    pl.first_byte(timed=False)
                    pl.observe(payload)
                    pl.finish(True)
            except TransportError as exc:
                f = FAILURES[type(exc)]
                msg = f"backend {b.name}: {exc}"
                failure = (f, msg)
                bs.error(f.kind, msg, loop.time())
                ex.failed.append(bs)
                self.health.record_failure(b)
                exclude.append(b)
                attempt += 1
                backoff = True
                if not (config.retry_on_timeout if f.retry is None else f.retry):
                    break
                continue
            finally:
                if pl is not None:
                    pl.finish(False)      # unless told otherwise above: the slot's content is unknown
                if reply is not None and not reply.streaming:
                    reply.release()
                self._release(b)
                b.circuit.abandoned()
            status = reply.status
            ex.ttfb = ttfb = loop.time() - ex.t0
            ex.nbytes = len(payload)
            out_headers = self._response_headers(reply, ex.rid, b)
            if adm.assemble and reply.streaming:
                for k in [k for k in out_headers if k.lower() in ("content-type", "cache-control")]:
                    del out_headers[k]
                out_headers["Content-Type"] = "application/json"
            answer = web.Response(body=payload, status=status, headers=out_headers)
            if status == 501:
                # Not Implemented: an endpoint this engine lacks (llama-server's embeddings without
                # --embeddings), not a broken backend. Learned, and asked elsewhere.
                if endpoint not in b.lacks:
                    b.lacks.add(endpoint)
                    log.info("backend %s: does not serve %s (501); it is not asked for it again", b.name, endpoint)
                lacking.append(b.name)
                exclude.append(b)
                continue
            if status >= 500:
                self.health.record_failure(b)
                bs.error(f"http_{status}", payload[:200].decode(errors="replace"), loop.time())
                ex.failed.append(bs)
                attempt += 1
                if status in RETRY_STATUSES and attempt < self.attempts:
                    exclude.append(b)
                    fallback = answer
                    backoff = True
                    continue
                mstats.error(f"http_{status}", f"backend {b.name} answered {status}", loop.time())
            else:
                if not b.circuit.clean:
                    self.health.record_success(b)
                if payload:
                    usage = usage_of(payload)
                    if usage is not None:
                        bs.add_tokens(usage)
                        mstats.add_tokens(usage)
                        ex.tokens = usage[0] + usage[1]
            own = loop.time() - ex.tried
            bs.latency.add(own)
            mstats.latency.add(ttfb)
            if not (adm.assemble and reply.streaming):      # else taken at the stream's first token
                bs.ttft.add(own)
                mstats.ttft.add(ttfb)
            if status < 500:
                absorbed(ex)
            mstats.overhead.add(ex.sent - ex.started)      # the router's own time before the backend had it
            return answer
        if lacking and fallback is None and failure is None:
            ex.status = 501
            raise ApiError(501, f"no backend serving model '{adm.model}' answers {endpoint}: "
                                f"{', '.join(sorted(set(lacking)))} answered 501 Not Implemented",
                           "invalid_request_error", "unsupported_endpoint")
        if fallback is not None:
            ex.status = fallback.status
            mstats.error(f"http_{ex.status}", "every backend tried answered 5xx", loop.time())
            return fallback
        if failure is None:
            raise ApiError(503, f"no healthy backend serves model '{adm.model}'" if adm.model else
                           "No healthy services available", "server_error", "no_healthy_backend",
                           headers={"Retry-After": "2"})
        f, msg = failure
        mstats.error(f.kind, msg, loop.time())
        raise ApiError(f.status, f"{f.message}: {msg}", "server_error", f.code,
                       headers={"Retry-After": "2"} if f.status == 503 else None)

    async def _gather(self, reply: Reply, pl: Placement | None, path: bytes, b: Backend, mstats: Counters,
                      ex: Exchange) -> bytes:
        """The non-streamed answer assembled from the engine's stream. The stream's first piece is
        the request's time to first token; a client that leaves cancels this, which closes the
        stream, so the engine stops at its next token."""
        asm = Assembler(b"chat" in path)
        loop = asyncio.get_running_loop()
        bad: list[BaseException] = []

        def sink(data: bytes) -> bool:
            if ex.ttfb is None:
                now = loop.time()
                ex.ttfb = now - ex.t0
                b.stats.ttft.add(now - ex.tried)
                mstats.ttft.add(ex.ttfb)
                if pl is not None:
                    pl.first_byte()
            if pl is not None and (b'"timings"' in data or b'"cached_tokens"' in data):
                pl.observe(data)
            if not bad:
                try:
                    asm.feed(data)
                except (StreamError, ValueError) as exc:
                    bad.append(exc)
            return False

        async def never_full() -> None:
            return None

        try:
            await reply.relay(sink, never_full)
        except BaseException:
            reply.close()
            raise
        ex.ttfb = None                       # the client's first byte is the whole answer, now
        if bad:
            if isinstance(bad[0], StreamError):
                raise StreamErrorEvent(f"the backend sent an error event: {bad[0]}")
            raise ProtocolError(f"a stream the router could not read: {bad[0]}")
        if not asm.done and not asm.choices:
            raise ProtocolError("the stream ended with no answer")
        return dumps(asm.answer()).encode()

    async def _send(self, b: Backend, pl: Placement | None, method: bytes, path: bytes, headers: bytes,
                    body: bytes) -> tuple[Reply, bytes | None]:
        """Send one request to `b`, in the slot the cache model chose if it chose one; the reply, and
        its body when it had to be read here. An engine that refuses the slot field gets the request
        again without it, and is routed without slots from then on: the request never fails for it."""
        pool = self.pool
        target = pool.target(b.url)
        sent = body
        if pl is not None:
            pin = pl.pin
            if pin is not None:
                pinned = with_slot(body, pin)
                if pinned is None:
                    pl.slot = None        # not spliceable: the engine chooses, the model does not know where
                else:
                    sent = pinned
            pl.sent()
        reply = await pool.request(target, method, path, headers, sent, b.pending)
        if sent is body or reply.streaming or reply.status not in (400, 422):
            return reply, None
        payload = await reply.read()
        if pl is None or not slot_refused(reply.status, payload):
            return reply, payload
        why = payload[:200].decode(errors="replace")
        log.warning("backend %s: the engine refuses the slot field (%s); it is routed without slots from now on",
                    b.name, why)
        pl.unpin(f"the engine refused the slot field: {why}")
        return await pool.request(target, method, path, headers, body, b.pending), None

    # -- relay: a stream, piece by piece, with no more retries once headers are out ------------------------
    async def _relay(self, request: web.BaseRequest, adm: Admitted, route: Route, reply: Reply, b: Backend,
                     mstats: Counters, ex: Exchange, exclude: list[Backend]) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        out = web.StreamResponse(status=reply.status, headers=self._response_headers(reply, ex.rid, b))
        if reply.status >= 500:
            self.health.record_failure(b)
        elif not b.circuit.clean:
            self.health.record_success(b)
        kind = migratable(request.raw_path, adm.data) if self.config.migrations and reply.status == 200 else None
        transcript = Transcript(kind) if kind else None
        relay: StreamRelay | None = None
        held: list[Backend] = []        # backends taken on by migration (the first is the caller's)
        try:
            writer = await out.prepare(request)
            # The router's own time: before the backend had the request, and from the backend's
            # head to the client's (the body's pieces then go through as they come).
            mstats.overhead.add(ex.sent - ex.started + perf_counter() - ex.answered)
            transport = request.transport
            if writer is None or transport is None:
                raise ClientGone()
            if not isinstance(writer, StreamWriter):  # the relay frames the body itself: it needs `chunked`
                raise TypeError(f"cannot relay a stream through {type(writer).__name__}")
            relay = StreamRelay(transport, writer.chunked, writer, ex, loop, (b.stats, mstats), transcript)
            relay.placement = route.placement
            while True:
                try:
                    await reply.relay(relay, relay.drain)
                    break
                except TransportError as exc:
                    reply.close()
                    f = FAILURES[type(exc)]
                    msg = f"backend {b.name} failed mid-stream: {exc}"
                    b.stats.error(f.stream_kind, msg, loop.time())
                    b.stats.latency.add(loop.time() - ex.tried)
                    ex.failed.append(b.stats)
                    self.health.record_failure(b)
                    exclude.append(b)
                    moved = None
                    if transcript is not None and ex.migrations < self.config.migrations:
                        moved = await self._migrate(adm, route, transcript, exclude, ex)
                    if moved is None:
                        mstats.error(f.stream_kind, msg, loop.time())
                        # Never a made-up clean end: the client learns the stream broke.
                        relay.transcript = None
                        relay(b"\n\ndata: " + dumps(error_body(msg, "server_error", "upstream_stream_error")).encode()
                              + b"\n\n")
                        break
                    b.stats.migrations += 1
                    mstats.migrations += 1
                    if relay.placement is not None:
                        relay.placement.finish(False)
                    relay.placement = route.placement
                    reply, b = moved
                    held.append(b)
                    relay.counters = (b.stats, mstats)
        except (ClientGone, ConnectionError, asyncio.CancelledError) as exc:
            # The client went away (the server cancels the handler when it does): drop the backend
            # connection so generation stops. A client that hangs up after `[DONE]` had its answer.
            reply.close()
            if relay is None or not relay.done_seen:
                b.stats.error("client_disconnect", "client went away mid-stream", loop.time())
                mstats.error("client_disconnect", "client went away mid-stream", loop.time())
            if isinstance(exc, asyncio.CancelledError):
                raise
            return out
        finally:
            if relay is not None and relay.placement is not None:
                relay.placement.finish(relay.done_seen or reply.complete)
            elif route.placement is not None:
                route.placement.finish(False)
            now = loop.time()
            b.stats.latency.add(now - ex.tried)
            mstats.latency.add(now - ex.t0)
            if relay is not None and relay.done_seen:
                absorbed(ex)
            for h in held:
                self._release(h)
        try:
            await out.write_eof()
        except ConnectionError:
            pass
        return out

    async def _migrate(self, adm: Admitted, route: Route, transcript: Transcript, exclude: list[Backend],
                       ex: Exchange) -> tuple[Reply, Backend] | None:
        """Send what the client has so far to another backend; its stream, or None if none can go on."""
        progress = transcript.progress()
        assert adm.data is not None
        body = continuation(adm.data, progress)
        if body is None:
            return None
        b = adm.group.policy.pick(adm.group, route, exclude)
        if b is None:
            return None
        try:
            b = await self._place(adm, route, ex, b, exclude, first=True)   # like any request, but first
        except ApiError:
            return None
        pl = route.placement
        if pl is not None:
            if pl.pin is not None:
                body["id_slot"] = pl.pin
            pl.sent()
        ex.migrations += 1
        log.warning("request %s: backend %s failed mid-stream after %d tokens; continuing on %s",
                    ex.rid, ex.backend, progress.tokens, b.name)
        ex.backend = b.name
        pool = self.pool
        b.stats.request_count += 1
        ex.tried = asyncio.get_running_loop().time()
        try:
            reply = await pool.request(pool.target(b.url), b"POST", adm.path.encode(),
                                       adm.headers + b.auth_lines if b.auth_lines else adm.headers,
                                       json.dumps(body).encode(), b.pending)
        except TransportError as exc:
            f = FAILURES[type(exc)]
            b.stats.error(f.kind, f"backend {b.name}: {exc}", asyncio.get_running_loop().time())
            self.health.record_failure(b)
            self._release(b)
            if pl is not None:
                pl.finish(False)
            return None
        if reply.status != 200 or not reply.streaming:
            # An engine that refuses to continue a final message: the client gets the error event.
            payload = await reply.read() if not reply.streaming else b""
            reply.close()
            b.stats.error(f"http_{reply.status}", payload[:200].decode(errors="replace") or "not a stream",
                          asyncio.get_running_loop().time())
            self._release(b)
            if pl is not None:
                pl.finish(False)
            return None
        transcript.continue_with(progress)
        return reply, b

    @staticmethod
    def _response_headers(reply: Reply, rid: str, b: Backend) -> dict[str, str]:
        out = {k.decode("latin-1"): v.decode("latin-1") for k, v in reply.headers if k.lower() not in DROP_RESPONSE}
        out["X-Request-ID"] = rid
        out["X-InfiniLM-Backend"] = b.name
        return out

    # -- places on backends: the engines' capacity, and the model's queue ---------------------------------
    async def _place(self, adm: Admitted, route: Route, ex: Exchange, b: Backend, exclude: list[Backend],
                     first: bool = False) -> Backend:
        """A backend with a place taken for this request: the policy's choice `b` if it has one free
        (and the request's class may take it), else the policy's next choice that has, else the
        first of the model's backends to free one, after waiting in the model's queue (`first`: a
        migration, which waits ahead of every class). 429 when the queue has no room for it (with
        when to come back), 503 when the wait is over."""
        ask = ex.ask
        assert ask is not None
        q = ask.queue
        policy = adm.group.policy
        if q.may_start(0 if first else ask.rank):
            if b.admission.try_enter():
                return b
            tried = [*exclude, b]
            for _ in range(3):
                alt = policy.pick(adm.group, route, tried)
                if alt is None:
                    break
                if alt.admission.try_enter():
                    return alt
                tried.append(alt)
        waiting = q.ask(ask.tenant.name, 0, ask.cost) if first else ask
        key = request_key(ask.tenant.name, adm.body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout
        while True:
            try:
                got = await q.wait(waiting, key, max(0.0, deadline - loop.time()))
            except QueueFull as exc:
                raise ApiError(429, f"model '{adm.model}' is at capacity and its queue has no room for this "
                                    f"request: {exc}; retry after {exc.retry_after} s", "rate_limit_error",
                               "queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
            except QueueTimeout:
                raise ApiError(503, f"model '{adm.model}' stayed at capacity for {self.config.queue_timeout:g}s",
                               "server_error", "queue_timeout", headers={"Retry-After": "1"}) from None
            if got not in exclude:
                break
            got.admission.leave()        # a backend that already failed this request: wait on
        if got is not b and route.placement is not None:
            # The cache model placed it on `b`: place it again on the backend it got.
            solo = Group(adm.group.key, policy)
            solo.refresh([got])
            policy.pick(solo, route)
        return got

    @staticmethod
    def _release(b: Backend) -> None:
        b.admission.leave()
