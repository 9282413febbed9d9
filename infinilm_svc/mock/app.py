"""A fast OpenAI-compatible stand-in for an inference server, whose answers name who served them."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import re
import struct
import sys
import time
import uuid
from typing import Any

from aiohttp import web

from ..errors import ApiError, error_response, expect_continue, read_json_object
from ..wire import dumps, json_response
from .options import MockOptions
from .slots import Lease, SlotEngine

log = logging.getLogger(__name__)

OPTIONS = web.AppKey("mock_options", MockOptions)

_FILLER = ("and", "so", "on", "more", "words", "to", "stream")
# The request fields OpenAI defines for chat, completions and embeddings (what --strict-fields accepts).
OPENAI_FIELDS = frozenset({
    "model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
    "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format", "suffix", "echo", "best_of",
    "service_tier", "store", "metadata", "prompt_cache_key", "reasoning_effort", "modalities", "audio",
    "prediction", "web_search_options", "safety_identifier", "verbosity", "input", "encoding_format",
    "dimensions"})
_BEGUN_BY = re.compile(r"Hello from (\S+)")


class MockState:
    """Per-app counters and the precomputed bits every request reuses."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.models = set(options.models)
        self.requests = 0
        self.hung = asyncio.Event()  # set only on shutdown: hung requests wait on it
        created = int(time.time())
        self.model_list = [{"id": m, "object": "model", "created": created, "owned_by": options.name}
                           for m in options.models]
        self.models_body = dumps({"object": "list", "data": self.model_list})
        self.health_body = dumps({"status": "healthy", "service": options.name,
                                       "models": list(options.models)})
        self._pieces: dict[str, list[str]] = {}
        self.engine = SlotEngine(options.slots, options.prefill_ms_per_token) if options.slots else None

    def pieces(self, model: str, name: str | None = None) -> list[str]:
        """The answer of mock `name` (this one by default) for `model`, cut into the chunks a stream
        sends (cached). The answer depends on nothing else, so any mock can continue another's."""
        name = name or self.options.name
        out = self._pieces.get(f"{name}\0{model}")
        if out is None:
            words = f"Hello from {name} (model: {model})".split(" ")
            n = self.options.chunks or len(words)
            while len(words) < n:
                words.append(_FILLER[len(words) % len(_FILLER)])
            # n groups of consecutive words; every group but the first starts with a space.
            size, extra = divmod(len(words), n)
            out, i = [], 0
            for k in range(n):
                take = size + (1 if k < extra else 0)
                out.append(" ".join(words[i:i + take]))
                i += take
            out = [p if k == 0 else " " + p for k, p in enumerate(out)]
            self._pieces[f"{name}\0{model}"] = out
        return out

    def continuation(self, model: str, partial: str) -> list[str] | None:
        """The rest of the answer that `partial` begins (a mock's answer names who began it), or None."""
        m = _BEGUN_BY.match(partial)
        whole = self.pieces(model, m.group(1) if m else None)
        done = ""
        for k, piece in enumerate(whole):
            if done == partial:
                return whole[k:]
            done += piece
            if not done.startswith(partial) and not partial.startswith(done):
                return None
        text = "".join(whole)
        if text.startswith(partial):
            return [text[len(partial):]] if len(text) > len(partial) else []
        return None


STATE = web.AppKey("mock_state", MockState)


def _log_line(request: web.Request, status: int) -> None:
    rid = request.headers.get("X-Request-ID", "-")
    model = request.get("model", "-")
    stream = "true" if request.get("stream") else "false"
    sys.stdout.write(f"request id={rid} method={request.method} path={request.path} "
                     f"model={model} stream={stream} status={status}\n")
    sys.stdout.flush()


@web.middleware
async def mock_middleware(request: web.Request, handler):
    """Counts requests (for --crash-after/--hang-after), answers errors, logs one line each."""
    state = request.app[STATE]
    opts = state.options
    state.requests += 1
    if opts.crash_after is not None and state.requests > opts.crash_after:
        sys.stdout.write(f"mock {opts.name}: crashing after {opts.crash_after} requests\n")
        sys.stdout.flush()
        os._exit(3)
    if opts.hang_after is not None and state.requests > opts.hang_after:
        if state.requests == opts.hang_after + 1:
            sys.stdout.write(f"mock {opts.name}: hanging after {opts.hang_after} requests\n")
            sys.stdout.flush()
        await state.hung.wait()
        request["model"] = "-"
        _log_line(request, 503)
        return error_response(503, f"{opts.name} is shutting down", "server_error")
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except ApiError as exc:
        status = exc.status
        return exc.response()
    except web.HTTPException as exc:
        status = exc.status
        if status < 400:
            raise
        msg = "no such endpoint" if status == 404 else (exc.reason or "error")
        return error_response(status, msg)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must still answer with the envelope
        status = 500
        log.exception("mock %s: unhandled error on %s %s", opts.name, request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
    finally:
        _log_line(request, status)


async def _request_body(request: web.Request) -> tuple[dict, str]:
    """The JSON body and its known model; 400 for bad JSON or no model, 404 for an unknown one."""
    body = await read_json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "missing required field: model (a string)", code="missing_field")
    request["model"] = model
    request["stream"] = bool(body.get("stream"))
    state = request.app[STATE]
    if model not in state.models:
        raise ApiError(404, f"The model '{model}' does not exist on {state.options.name}",
                       code="model_not_found")
    if state.options.strict_fields:
        unknown = sorted(k for k in body if k not in OPENAI_FIELDS)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                           code="unknown_parameter")
    if state.options.fail_rate > 0 and random.random() < state.options.fail_rate:
        raise ApiError(500, f"injected failure on {state.options.name}", "server_error", code="injected_failure")
    return body, model


def _count_words(value: Any) -> int:
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, list):
        return sum(_count_words(v) for v in value)
    if isinstance(value, dict):
        return _count_words(value.get("content", "")) if "content" in value else 1
    return 1


def _usage(prompt: int, completion: int, lease: Lease | None = None) -> dict:
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
    if lease is not None:
        out["prompt_tokens_details"] = lease.usage_details()
    return out


def _limit(body: dict) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ApiError(400, f"{key} must be >= 1, got {v}", code="invalid_value")
            return v
    return None


async def _die(request: web.Request, why: str) -> None:
    """Drop the connection mid-answer, as a crashing engine would."""
    sys.stdout.write(f"mock {request.app[STATE].options.name}: dropping the connection {why}\n")
    sys.stdout.flush()
    assert request.transport is not None
    request.transport.abort()
    raise asyncio.CancelledError()


async def _generate(request: web.Request, model: str, chat: bool, prompt_tokens: int,
                    include_usage: bool, pieces: list[str], limit: int | None,
                    lease: Lease | None = None) -> web.StreamResponse:
    state = request.app[STATE]
    if lease is None:
        return await _answer(request, model, chat, prompt_tokens, include_usage, pieces, limit, None)
    assert state.engine is not None
    done = False
    try:
        resp = await _answer(request, model, chat, lease.prompt_tokens, include_usage, pieces, limit, lease)
        done = True
        return resp
    finally:
        # What the slot holds afterwards: the prompt, and the answer when it was generated whole.
        state.engine.release(lease, "".join(pieces) if done else "")


async def _answer(request: web.Request, model: str, chat: bool, prompt_tokens: int, include_usage: bool,
                  pieces: list[str], limit: int | None, lease: Lease | None) -> web.StreamResponse:
    state = request.app[STATE]
    opts = state.options
    finish = "stop"
    if limit is not None and limit < len(pieces):
        pieces, finish = pieces[:limit], "length"
    die = opts.die_mid_stream_after
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    if not request["stream"]:
        delay = opts.latency + opts.chunk_interval * max(0, len(pieces) - 1)
        if delay > 0:
            await asyncio.sleep(delay)
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "usage": _usage(prompt_tokens, len(pieces), lease)}
        if lease is not None:
            body["timings"] = lease.timings(len(pieces))
        if die is not None:
            raw = dumps(body).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(raw[:len(raw) // 2])
            await _die(request, "halfway through a body")
        return web.Response(text=dumps(body), content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    if opts.latency > 0:
        await asyncio.sleep(opts.latency)
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": obj, "created": created, "model": model}

    def event(choice: dict, **extra: Any) -> bytes:
        return b"data: " + dumps({**head, "choices": [choice], **extra}).encode() + b"\n\n"

    out: list[bytes] = []  # with no interval, the whole stream goes out in one write
    if chat:
        out.append(event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}))
    for k, piece in enumerate(pieces):
        if die is not None and k == die:
            await resp.write(b"".join(out))
            await _die(request, f"after {die} chunks")
        if k and opts.chunk_interval > 0:
            await resp.write(b"".join(out))
            out.clear()
            await asyncio.sleep(opts.chunk_interval)
        if chat:
            out.append(event({"index": 0, "delta": {"content": piece}, "finish_reason": None}))
        else:
            out.append(event({"index": 0, "text": piece, "logprobs": None, "finish_reason": None}))
    final = {"index": 0, "delta": {}, "finish_reason": finish} if chat else \
        {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
    usage = _usage(prompt_tokens, len(pieces), lease)
    if lease is not None:
        out.append(event(final, usage=usage, timings=lease.timings(len(pieces))))
    else:
        out.append(event(final, usage=usage))
    if include_usage:
        out.append(b"data: " + dumps({**head, "choices": [], "usage": usage}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    await resp.write(b"".join(out))
    await resp.write_eof()
    return resp


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error message: `an empty array`, `a string`, ..."""
    if isinstance(value, list):
        return "an empty array"
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return kinds.get(type(value), "null")


def _include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: the OpenAI usage-only chunk at the end of a stream."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, model = await _request_body(request)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "missing required field: messages (a non-empty array)", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty array, got {_json_kind(messages)}", code="invalid_value")
    state = request.app[STATE]
    pieces = state.pieces(model)
    last = messages[-1]
    if body.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant":
        partial = last.get("content")
        rest = state.continuation(model, partial) if isinstance(partial, str) else None
        if rest is None:
            raise ApiError(400, "cannot continue that final assistant message", code="invalid_continuation")
        pieces = rest
    limit = _limit(body)
    lease = await state.engine.acquire(body) if state.engine is not None else None
    return await _generate(request, model, True, _count_words(messages), _include_usage(body), pieces, limit, lease)


async def completions(request: web.Request) -> web.StreamResponse:
    body, model = await _request_body(request)
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "missing required field: prompt (a string or an array)", code="missing_field")
    if not isinstance(prompt, (str, list)):
        raise ApiError(400, f"prompt must be a string or an array, got {_json_kind(prompt)}", code="invalid_value")
    state = request.app[STATE]
    pieces = state.pieces(model)
    # A prompt that ends with the start of a mock's answer is continued from there.
    text = prompt if isinstance(prompt, str) else (prompt[0] if len(prompt) == 1 and isinstance(prompt[0], str) else "")
    begun = text.rfind("Hello")
    if begun >= 0:
        rest = state.continuation(model, text[begun:])
        if rest is not None:
            pieces = rest
    limit = _limit(body)
    lease = await state.engine.acquire(body) if state.engine is not None else None
    return await _generate(request, model, False, _count_words(prompt), _include_usage(body), pieces, limit, lease)


def _embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    raw = b""
    seed = text.encode()
    i = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(seed + i.to_bytes(4, "little")).digest()
        i += 1
    ints = struct.unpack(f"<{dim}I", raw[:dim * 4])
    vec = [v / 4294967295.0 * 2.0 - 1.0 for v in ints]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


async def embeddings(request: web.Request) -> web.Response:
    if request.app[OPTIONS].no_embeddings:
        raise ApiError(501, "This server does not support embeddings. Start it with `--embeddings`",
                       "not_supported_error")
    body, model = await _request_body(request)
    inp = body.get("input")
    if isinstance(inp, str):
        items = [inp]
    elif isinstance(inp, list) and inp:
        items = [x if isinstance(x, str) else json.dumps(x) for x in inp]
    else:
        raise ApiError(400, "missing required field: input (a string or a non-empty array)", code="missing_field")
    dim = request.app[OPTIONS].embedding_dim
    data = [{"object": "embedding", "index": i, "embedding": _embedding(t, dim)} for i, t in enumerate(items)]
    tokens = _count_words(items)
    return json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def list_models(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].models_body, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].health_body, content_type="application/json")


async def props(request: web.Request) -> web.Response:
    """llama-server's /props, as far as the slot emulation goes (404 without slots, as other engines)."""
    engine = request.app[STATE].engine
    if engine is None:
        raise web.HTTPNotFound()
    return json_response(engine.props())


async def slots(request: web.Request) -> web.Response:
    """llama-server's /slots: whether each slot is at work."""
    engine = request.app[STATE].engine
    if engine is None:
        raise web.HTTPNotFound()
    return json_response(engine.status())


async def _release_hung(app: web.Application) -> None:
    """On shutdown, hung requests end at once rather than holding the graceful stop."""
    app[STATE].hung.set()


def create_app(options: MockOptions) -> web.Application:
    """The mock's aiohttp app (no access log: the middleware writes the one line per request)."""
    app = web.Application(middlewares=[mock_middleware], client_max_size=16 << 20)
    app[OPTIONS] = options
    app[STATE] = MockState(options)
    app.on_shutdown.append(_release_hung)
    r = app.router
    for prefix in ("/v1", ""):
        r.add_get(f"{prefix}/models", list_models)
        r.add_post(f"{prefix}/chat/completions", chat_completions, expect_handler=expect_continue)
        r.add_post(f"{prefix}/completions", completions, expect_handler=expect_continue)
        r.add_post(f"{prefix}/embeddings", embeddings, expect_handler=expect_continue)
    r.add_get("/health", health)
    r.add_get("/props", props)
    r.add_get("/slots", slots)
    return app
