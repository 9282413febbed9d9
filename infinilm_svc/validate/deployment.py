"""The deployment as one validate run sees it: registry records, the router, and chat requests sent through it."""
from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import aiohttp

from ..client.babysitter import BabysitterClient
from ..wire import dumps
from .options import ValidateOptions

ANSWER_RE = re.compile(r"Hello from (\S+) \(model: ([^)]+)\)")


@dataclass
class Answer:
    """One chat completion sent through the router."""

    request_id: str
    model: str
    stream: bool
    status: int | None = None
    content: str = ""
    served_by: str | None = None      # the backend record that answered
    routed_to: str | None = None      # the backend the router says it used (X-InfiniLM-Backend)
    done: bool = False                # streaming: saw data: [DONE]
    error: str | None = None
    completion_tokens: int | None = None  # from the answer's usage (streamed: the include_usage chunk)


@dataclass
class Run:
    """State shared by the checks of one run."""

    options: ValidateOptions
    session: aiohttp.ClientSession
    babysitters: BabysitterClient
    records: list[dict] = field(default_factory=list)
    registry_error: str | None = None
    router: str | None = None
    router_note: str = ""
    other_routers: list[str] = field(default_factory=list)   # further registered routers, checked too
    answers: list[Answer] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seq: int = 0

    def new_id(self, tag: str) -> str:
        self.seq += 1
        return f"validate-{self.run_id}-{tag}-{self.seq}"

    # --- registry views -------------------------------------------------------------------
    def record(self, name: str) -> dict | None:
        for r in self.records:
            if r.get("name") == name:
                return r
        return None

    def backends(self) -> list[dict]:
        return [r for r in self.records if metadata_of(r).get("type") == "openai-api"]

    def backend_for_mock(self, mock_name: str) -> str | None:
        """The backend record whose mock answered as `mock_name`."""
        for r in self.backends():
            meta = metadata_of(r)
            names = {r.get("name"), meta.get("parent_service"), meta.get("mock_name")}
            if mock_name in names:
                return r.get("name")
        for s in self.options.expect_services:
            if mock_name in (s.name, s.backend):
                return s.backend
        return None

    def models_of(self, backend: str) -> tuple[str, ...]:
        for s in self.options.expect_services:
            if s.backend == backend and s.models:
                return s.models
        rec = self.record(backend)
        return tuple(metadata_of(rec).get("models") or ()) if rec else ()

    def backends_for_model(self, model: str) -> list[str]:
        """Expected backends serving `model` (by the expected placement, else the registry)."""
        out = [s.backend for s in self.options.expect_services if model in self.models_of(s.backend)]
        for r in self.backends():
            if model in (metadata_of(r).get("models") or ()) and r.get("is_healthy") and r.get("name") not in out:
                out.append(r["name"])
        return out

    def babysitter_url(self, backend: str) -> str | None:
        """Where `backend`'s babysitter answers: its metadata, else its parent's record, else port + 1."""
        rec = self.record(backend)
        meta = metadata_of(rec)
        url = meta.get("babysitter_url")
        if isinstance(url, str) and url:
            return url.rstrip("/")
        parent = self.record(meta.get("parent_service") or backend.removesuffix("-server"))
        if parent is not None and parent.get("url"):
            return str(parent["url"]).rstrip("/")
        if rec is not None and rec.get("host") and isinstance(rec.get("port"), int):
            return f"http://{rec['host']}:{rec['port'] + 1}"
        return None


def metadata_of(record: Mapping | None) -> Mapping:
    """A record's metadata, or an empty mapping when it has none (or not a mapping)."""
    meta = (record or {}).get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def shorten(body: Any, limit: int = 160) -> str:
    """A body as at most `limit` characters of text, for a check's detail."""
    text = body if isinstance(body, str) else dumps(body)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_message(body: Any) -> str:
    """The message and code of an OpenAI error envelope, else the body shortened."""
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        if isinstance(err, dict):
            return f"{err.get('message')} (code {err.get('code')})"
        return str(err)
    return shorten(body)


async def request_json(run: Run, method: str, url: str, body: Any = None,
                       headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP call with the run's timeout: the status and the JSON body (or the text when it is not JSON)."""
    timeout = aiohttp.ClientTimeout(total=run.options.timeout)
    async with run.session.request(method, url, json=body, headers=headers, timeout=timeout) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")


async def refresh_records(run: Run) -> None:
    """Re-read the registry's records into run.records (empty, with run.registry_error set, when it fails)."""
    try:
        status, body = await request_json(run, "GET", run.options.registry.rstrip("/") + "/services")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        run.registry_error = f"cannot reach the registry at {run.options.registry}: {type(exc).__name__}: {exc}"
        run.records = []
        return
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("services"), list):
        run.registry_error = f"GET {run.options.registry}/services answered {status}: {shorten(body)}"
        run.records = []
        return
    run.registry_error = None
    run.records = [r for r in body["services"] if isinstance(r, dict)]


async def chat(run: Run, model: str, stream: bool, tag: str) -> Answer:
    """Send one chat completion through the router with a known X-Request-ID."""
    ans = Answer(request_id=run.new_id(tag), model=model, stream=stream)
    body = {"model": model, "stream": stream, "max_tokens": 16,
            "messages": [{"role": "user", "content": f"validate {ans.request_id}"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    timeout = aiohttp.ClientTimeout(total=run.options.timeout)
    try:
        async with run.session.post(f"{run.router}/v1/chat/completions", json=body, timeout=timeout,
                                    headers={"X-Request-ID": ans.request_id}) as resp:
            ans.status = resp.status
            ans.routed_to = resp.headers.get("X-InfiniLM-Backend")
            if resp.status != 200:
                raw = await resp.read()
                try:
                    ans.error = f"HTTP {resp.status}: {error_message(json.loads(raw))}"
                except ValueError:
                    ans.error = f"HTTP {resp.status}: {shorten(raw.decode(errors='replace'))}"
                return ans
            if stream:
                parts: list[str] = []
                async for raw_line in resp.content:
                    line = raw_line.decode(errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ans.done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        ans.error = f"unparsable SSE event {shorten(data)}"
                        break
                    if isinstance(chunk, dict) and "error" in chunk:
                        ans.error = f"stream error event: {error_message(chunk)}"
                        break
                    _take_usage(ans, chunk)
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if isinstance(delta.get("content"), str):
                            parts.append(delta["content"])
                ans.content = "".join(parts)
                if ans.error is None and not ans.done:
                    ans.error = "the stream ended without data: [DONE]"
            else:
                data = await resp.json(content_type=None)
                _take_usage(ans, data)
                try:
                    ans.content = data["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    ans.error = f"no choices[0].message.content in {shorten(data)}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        ans.error = f"{type(exc).__name__}: {exc}"
        return ans
    m = ANSWER_RE.search(ans.content)
    if m:
        # A mock names itself in its answer: that attribution does not depend on the router.
        ans.served_by = run.backend_for_mock(m.group(1)) or f"?{m.group(1)}"
        if m.group(2) != model:
            ans.error = f"answer is for model {m.group(2)!r}, asked for {model!r}"
        elif ans.routed_to and ans.error is None and ans.routed_to != ans.served_by:
            ans.error = (f"the router says {ans.routed_to} served it (X-InfiniLM-Backend) but the answer "
                         f"comes from {ans.served_by}")
    elif ans.error is None and ans.routed_to and run.record(ans.routed_to) is not None:
        # A real model does not name its server: take the router's word for it.
        ans.served_by = ans.routed_to
    elif ans.error is None:
        ans.error = (f"answer does not say who served it (no 'Hello from <name> (model: M)' and no "
                     f"X-InfiniLM-Backend header naming a registered backend): {shorten(ans.content)}")
    run.answers.append(ans)
    return ans


def _take_usage(ans: Answer, body: Any) -> None:
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        ans.completion_tokens = usage["completion_tokens"]


ENGINE_TOKENS_METRIC = "llamacpp:tokens_predicted_total"


async def engine_tokens(run: Run, backend: str) -> tuple[float | None, str | None]:
    """The engine's own count of tokens it generated (llama-server's /metrics), or why it is unknown."""
    rec = run.record(backend)
    url = (rec or {}).get("url")
    if not isinstance(url, str) or not url:
        return None, f"no URL for {backend} in the registry"
    try:
        status, body = await request_json(run, "GET", url.rstrip("/") + "/metrics")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return None, f"cannot read {backend}'s /metrics: {type(exc).__name__}: {exc}"
    if status != 200 or not isinstance(body, str):
        return None, f"{backend}'s GET /metrics answered {status} (llama-server needs --metrics)"
    for line in body.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == ENGINE_TOKENS_METRIC:
            try:
                return float(parts[1]), None
            except ValueError:
                break
    return None, f"{backend}'s /metrics has no {ENGINE_TOKENS_METRIC}"


async def find_router(run: Run) -> None:
    """Set run.router: the --router URL, else a (healthy) router registered in the registry; say how in router_note."""
    if run.options.router:
        run.router = run.options.router.rstrip("/")
        return
    await refresh_records(run)
    if run.registry_error:
        run.router_note = f"no router given and the registry cannot tell: {run.registry_error}"
        return
    routers = [r for r in run.records if metadata_of(r).get("type") == "router"]
    healthy = [r for r in routers if r.get("is_healthy")] or routers
    for r in healthy:
        url = metadata_of(r).get("url") or r.get("url")
        if isinstance(url, str) and url:
            run.router = url.rstrip("/")
            others = len(routers) - 1
            for o in routers:
                o_url = metadata_of(o).get("url") or o.get("url")
                if o is not r and isinstance(o_url, str) and o_url:
                    run.other_routers.append(o_url.rstrip("/"))
            run.router_note = f"found in the registry as {r.get('name')}" + (f", {others} more router(s)" if others else "")
            return
    run.router_note = ("no router is registered in the registry (no record with metadata.type = 'router'); "
                       "give --router URL")
