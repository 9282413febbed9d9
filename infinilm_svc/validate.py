"""Scripted checks of a running deployment, found through its registry; every check can fail."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import textwrap
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping

import aiohttp

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

ANSWER_RE = re.compile(r"Hello from (\S+) \(model: ([^)]+)\)")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check, as shown in the table, the JSON and the console."""

    number: int
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ExpectedService:
    """A babysitter the deployment must have, and the models its backend must serve (empty: any)."""

    name: str
    models: tuple[str, ...] = ()

    @property
    def backend(self) -> str:
        return f"{self.name}-server"


DEMO_SERVICES = (
    ExpectedService("babysitter-a", ("model-1",)),
    ExpectedService("babysitter-b", ("model-2",)),
    ExpectedService("babysitter-c", ("model-1",)),
    ExpectedService("babysitter-d", ("model-2",)),
)


@dataclass(frozen=True)
class ValidateOptions:
    """What to check and where; the defaults describe the integration demo."""

    registry: str = "http://127.0.0.1:18000"
    router: str | None = None                 # default: the router registered in the registry
    expect_services: tuple[ExpectedService, ...] = DEMO_SERVICES
    expect_models: tuple[str, ...] | None = None   # default: every model of expect_services
    expect_hosts: tuple[str, ...] = ()        # addresses that must each host an expected record
    expect_host_count: int = 2                # distinct hosts among the expected records
    lb_requests: int = 8                      # requests per model for the load-balancing check
    log_tail: int = 2000                      # lines read from each babysitter's /logs
    log_wait: float = 5.0                     # how long a request may take to reach its backend's log
    chaos: bool = False
    chaos_service: str | None = None          # default: the last expected service that has a peer
    chaos_timeout: float = 30.0
    token: str | None = None                  # babysitter token for POST /stop and /start
    timeout: float = 10.0                     # per HTTP request
    wait: float = 0.0                         # wait up to this long for discovery before checking

    @property
    def models(self) -> tuple[str, ...]:
        if self.expect_models is not None:
            return self.expect_models
        seen: list[str] = []
        for s in self.expect_services:
            for m in s.models:
                if m not in seen:
                    seen.append(m)
        return tuple(seen)


def fair_share(requests: int, backends: int) -> int:
    """The fewest requests each of `backends` must serve out of `requests`: half an even split, rounded up."""
    if backends <= 0:
        return 0
    return math.ceil(requests / (2 * backends))


@dataclass
class _Answer:
    """One chat completion sent through the router."""

    request_id: str
    model: str
    stream: bool
    status: int | None = None
    content: str = ""
    served_by: str | None = None      # the mock name in the answer
    done: bool = False                # streaming: saw data: [DONE]
    error: str | None = None


@dataclass
class _Run:
    """State shared by the checks of one run."""

    options: ValidateOptions
    session: aiohttp.ClientSession
    records: list[dict] = field(default_factory=list)
    registry_error: str | None = None
    router: str | None = None
    router_note: str = ""
    answers: list[_Answer] = field(default_factory=list)
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
        return [r for r in self.records if _meta(r).get("type") == "openai-api"]

    def backend_for_mock(self, mock_name: str) -> str | None:
        """The backend record whose mock answered as `mock_name`."""
        for r in self.backends():
            meta = _meta(r)
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
        return tuple(_meta(rec).get("models") or ()) if rec else ()

    def backends_for_model(self, model: str) -> list[str]:
        """Expected backends serving `model` (by the expected placement, else the registry)."""
        out = [s.backend for s in self.options.expect_services if model in self.models_of(s.backend)]
        for r in self.backends():
            if model in (_meta(r).get("models") or ()) and r.get("is_healthy") and r.get("name") not in out:
                out.append(r["name"])
        return out

    def babysitter_url(self, backend: str) -> str | None:
        rec = self.record(backend)
        if rec is not None:
            url = _meta(rec).get("babysitter_url")
            if isinstance(url, str) and url:
                return url.rstrip("/")
            parent = self.record(_meta(rec).get("parent_service") or backend.removesuffix("-server"))
            if parent is not None and parent.get("url"):
                return str(parent["url"]).rstrip("/")
            if rec.get("host") and isinstance(rec.get("port"), int):
                return f"http://{rec['host']}:{rec['port'] + 1}"
        parent = self.record(backend.removesuffix("-server"))
        if parent is not None and parent.get("url"):
            return str(parent["url"]).rstrip("/")
        return None


def _meta(record: Mapping | None) -> Mapping:
    meta = (record or {}).get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _short(body: Any, limit: int = 160) -> str:
    text = body if isinstance(body, str) else json.dumps(body)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        if isinstance(err, dict):
            return f"{err.get('message')} (code {err.get('code')})"
        return str(err)
    return _short(body)


async def _get_json(run: _Run, url: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=run.options.timeout)
    async with run.session.get(url, timeout=timeout) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")


async def _post_json(run: _Run, url: str, body: Any = None, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=run.options.timeout)
    async with run.session.post(url, json=body, headers=headers, timeout=timeout) as resp:
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")


async def _refresh_records(run: _Run) -> None:
    try:
        status, body = await _get_json(run, run.options.registry.rstrip("/") + "/services")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        run.registry_error = f"cannot reach the registry at {run.options.registry}: {type(exc).__name__}: {exc}"
        run.records = []
        return
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("services"), list):
        run.registry_error = f"GET {run.options.registry}/services answered {status}: {_short(body)}"
        run.records = []
        return
    run.registry_error = None
    run.records = [r for r in body["services"] if isinstance(r, dict)]


async def _chat(run: _Run, model: str, stream: bool, tag: str) -> _Answer:
    """Send one chat completion through the router with a known X-Request-ID."""
    ans = _Answer(request_id=run.new_id(tag), model=model, stream=stream)
    body = {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": f"validate {ans.request_id}"}]}
    timeout = aiohttp.ClientTimeout(total=run.options.timeout)
    try:
        async with run.session.post(f"{run.router}/v1/chat/completions", json=body, timeout=timeout,
                                    headers={"X-Request-ID": ans.request_id}) as resp:
            ans.status = resp.status
            if resp.status != 200:
                raw = await resp.read()
                try:
                    ans.error = f"HTTP {resp.status}: {_error_message(json.loads(raw))}"
                except ValueError:
                    ans.error = f"HTTP {resp.status}: {_short(raw.decode(errors='replace'))}"
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
                        ans.error = f"unparsable SSE event {_short(data)}"
                        break
                    if isinstance(chunk, dict) and "error" in chunk:
                        ans.error = f"stream error event: {_error_message(chunk)}"
                        break
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if isinstance(delta.get("content"), str):
                            parts.append(delta["content"])
                ans.content = "".join(parts)
                if ans.error is None and not ans.done:
                    ans.error = "the stream ended without data: [DONE]"
            else:
                data = await resp.json(content_type=None)
                try:
                    ans.content = data["choices"][0]["message"]["content"]
                except (KeyError, IndexError, TypeError):
                    ans.error = f"no choices[0].message.content in {_short(data)}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        ans.error = f"{type(exc).__name__}: {exc}"
        return ans
    m = ANSWER_RE.search(ans.content)
    if m:
        ans.served_by = run.backend_for_mock(m.group(1)) or f"?{m.group(1)}"
        if m.group(2) != model:
            ans.error = f"answer is for model {m.group(2)!r}, asked for {model!r}"
    elif ans.error is None:
        ans.error = f"answer does not say who served it (no 'Hello from <name> (model: M)'): {_short(ans.content)}"
    run.answers.append(ans)
    return ans


# --- the checks ----------------------------------------------------------------------------

async def check_registry(run: _Run) -> CheckResult:
    name = "registry health"
    url = run.options.registry.rstrip("/")
    try:
        status, body = await _get_json(run, url + "/health")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return CheckResult(1, name, False, f"cannot reach the registry at {url}: {type(exc).__name__}: {exc}")
    if status != 200 or not isinstance(body, dict) or body.get("status") != "healthy":
        return CheckResult(1, name, False, f"GET {url}/health answered {status}: {_short(body)}")
    return CheckResult(1, name, True, f"{url}: {body.get('registered_services', '?')} services, "
                                      f"{body.get('healthy_services', '?')} healthy")


def _healthy_count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        head = value.split("/", 1)[0].strip()
        if head.isdigit():
            return int(head)
    return None


async def check_router(run: _Run) -> CheckResult:
    name = "router health"
    if run.router is None:
        return CheckResult(2, name, False, run.router_note or "no router to check")
    try:
        status, body = await _get_json(run, run.router + "/health")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        detail = f"cannot reach the router at {run.router}: {type(exc).__name__}: {exc}"
        run.router_note = f"skipped: the router at {run.router} is unreachable (check 2)"
        run.router = None
        return CheckResult(2, name, False, detail)
    if status != 200 or not isinstance(body, dict):
        return CheckResult(2, name, False, f"GET {run.router}/health answered {status}: {_short(body)}")
    healthy = _healthy_count(body.get("healthy_services"))
    if healthy is None or healthy < 1:
        return CheckResult(2, name, False, f"{run.router} has no healthy backend "
                                           f"(healthy_services={body.get('healthy_services')!r}, status={body.get('status')!r})")
    note = f" ({run.router_note})" if run.router_note else ""
    return CheckResult(2, name, True, f"{run.router}: {body.get('healthy_services')} backends healthy{note}")


def _discovery_problems(run: _Run) -> list[str]:
    """Everything check 3 finds missing or wrong; empty when discovery is complete."""
    if run.registry_error:
        return [run.registry_error]
    problems: list[str] = []
    missing: list[str] = []
    unhealthy: list[str] = []
    for s in run.options.expect_services:
        for rec_name in (s.name, s.backend):
            rec = run.record(rec_name)
            if rec is None:
                missing.append(rec_name)
            elif not rec.get("is_healthy"):
                age = ""
                if isinstance(rec.get("last_heartbeat"), (int, float)):
                    age = f", last heartbeat {time.time() - rec['last_heartbeat']:.0f} s ago"
                unhealthy.append(f"{rec_name} (status {rec.get('status')!r}{age})")
        rec = run.record(s.backend)
        if rec is not None:
            meta = _meta(rec)
            if meta.get("type") != "openai-api":
                problems.append(f"{s.backend} has metadata.type {meta.get('type')!r}, expected 'openai-api'")
            served = set(meta.get("models") or ())
            lacking = [m for m in s.models if m not in served]
            if lacking:
                problems.append(f"{s.backend} does not serve {', '.join(lacking)} (it serves {sorted(served)})")
    if missing:
        problems.insert(0, f"not registered: {', '.join(missing)}")
    if unhealthy:
        problems.insert(len(missing) > 0, f"not healthy: {', '.join(unhealthy)}")
    present = [run.record(n) for s in run.options.expect_services for n in (s.name, s.backend)]
    hosts = sorted({str(r.get("host")) for r in present if r is not None and r.get("is_healthy")})
    for h in run.options.expect_hosts:
        if h not in hosts:
            problems.append(f"no healthy expected record on host {h} (healthy hosts: {', '.join(hosts) or 'none'})")
    if len(hosts) < run.options.expect_host_count:
        problems.append(f"healthy expected records come from {len(hosts)} host(s) ({', '.join(hosts) or 'none'}), "
                        f"expected {run.options.expect_host_count}")
    return problems


async def check_discovery(run: _Run) -> CheckResult:
    name = "discovery"
    await _refresh_records(run)
    problems = _discovery_problems(run)
    n = len(run.options.expect_services)
    if problems:
        return CheckResult(3, name, False, "; ".join(problems))
    hosts = sorted({str(run.record(s.backend).get("host")) for s in run.options.expect_services})  # type: ignore[union-attr]
    return CheckResult(3, name, True, f"{n} babysitters and {n} backends registered and healthy, "
                                      f"on {len(hosts)} hosts ({', '.join(hosts)})")


async def check_aggregation(run: _Run) -> CheckResult:
    name = "model aggregation"
    if run.router is None:
        return CheckResult(4, name, False, run.router_note or "no router")
    expected = set(run.options.models)
    problems = []
    for path in ("/models", "/v1/models"):
        try:
            status, body = await _get_json(run, run.router + path)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problems.append(f"GET {path}: {type(exc).__name__}: {exc}")
            continue
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            problems.append(f"GET {path} answered {status}: {_short(body)}")
            continue
        ids = [m.get("id") for m in body["data"] if isinstance(m, dict)]
        got = set(ids)
        if got != expected:
            bits = []
            if expected - got:
                bits.append(f"missing {', '.join(sorted(expected - got))}")
            if got - expected:
                bits.append(f"unexpected {', '.join(sorted(map(str, got - expected)))}")
            problems.append(f"{path} lists {sorted(map(str, got))}: {'; '.join(bits)}")
        elif len(ids) != len(got):
            problems.append(f"{path} lists a model twice: {ids}")
    if problems:
        return CheckResult(4, name, False, "; ".join(problems))
    return CheckResult(4, name, True, f"/models and /v1/models list exactly {', '.join(sorted(expected))}")


async def check_chat(run: _Run, stream: bool) -> CheckResult:
    number, name = (6, "chat (streaming)") if stream else (5, "chat")
    if run.router is None:
        return CheckResult(number, name, False, run.router_note or "no router")
    if not run.options.models:
        return CheckResult(number, name, False, "no expected models to ask for")
    good, bad = [], []
    for model in run.options.models:
        ans = await _chat(run, model, stream, "stream" if stream else "chat")
        serving = run.backends_for_model(model)
        if ans.error:
            bad.append(f"{model}: {ans.error}")
        elif ans.served_by not in serving:
            bad.append(f"{model}: answered by {ans.served_by.lstrip('?')}, which does not serve it "
                       f"(expected one of {', '.join(serving) or 'none'})")
        else:
            good.append(f"{model} -> {ans.served_by}")
    if bad:
        return CheckResult(number, name, False, "; ".join(bad))
    return CheckResult(number, name, True, ", ".join(good))


async def check_balance(run: _Run) -> CheckResult:
    name = "load balancing"
    if run.router is None:
        return CheckResult(7, name, False, run.router_note or "no router")
    n = run.options.lb_requests
    problems, summary = [], []
    for model in run.options.models:
        serving = run.backends_for_model(model)
        counts: Counter[str] = Counter()
        errors: list[str] = []
        for i in range(n):
            ans = await _chat(run, model, stream=(i % 4 == 3), tag="lb")
            if ans.error:
                errors.append(ans.error)
            else:
                counts[ans.served_by or "?"] += 1
        need = fair_share(n, len(serving))
        spread = ", ".join(f"{b} {counts.get(b, 0)}" for b in serving)
        others = {b: c for b, c in counts.items() if b not in serving}
        if errors:
            problems.append(f"{model}: {len(errors)} of {n} requests failed ({errors[0]})")
            if len(errors) == n:
                continue
        if len(serving) < 2:
            problems.append(f"{model}: only {len(serving)} backend(s) expected to serve it ({', '.join(serving) or 'none'}); "
                            "load balancing needs 2")
        starved = [f"{b} served {counts.get(b, 0)} of {n}" for b in serving if counts.get(b, 0) < need]
        if starved:
            problems.append(f"{model}: {'; '.join(starved)} (fair share: each >= {need})")
        if others:
            problems.append(f"{model}: answered by backends that do not serve it: "
                            + ", ".join(f"{b.lstrip('?')} {c}" for b, c in others.items()))
        summary.append(f"{model}: {spread}")
    if problems:
        return CheckResult(7, name, False, "; ".join(problems))
    return CheckResult(7, name, True, f"{n} requests per model, each backend >= its fair share "
                                      f"(half an even split): " + "; ".join(summary))


def _log_has(lines: Iterable[str], request_id: str) -> bool:
    pat = re.compile(r"id=" + re.escape(request_id) + r"(?![\w-])")
    return any(pat.search(line) for line in lines)


async def _read_logs(run: _Run, backend: str) -> tuple[list[str] | None, str | None]:
    url = run.babysitter_url(backend)
    if url is None:
        return None, f"no babysitter URL for {backend} in the registry"
    try:
        status, body = await _get_json(run, f"{url}/logs?tail={run.options.log_tail}")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return None, f"cannot read {backend}'s log at {url}/logs: {type(exc).__name__}: {exc}"
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("lines"), list):
        return None, f"GET {url}/logs answered {status}: {_short(body)}"
    return [str(e.get("line", "")) if isinstance(e, dict) else str(e) for e in body["lines"]], None


async def check_logs(run: _Run) -> CheckResult:
    name = "request logs"
    if run.router is None:
        return CheckResult(8, name, False, run.router_note or "no router")
    # Fresh requests too, so the check stands on its own when run alone.
    for model in run.options.models:
        for stream in (False, True):
            await _chat(run, model, stream, "log")
    traced = [a for a in run.answers if a.error is None and a.served_by and not a.served_by.startswith("?")]
    if not traced:
        return CheckResult(8, name, False, "no request was answered by a known backend, nothing to trace")
    backends = sorted({s.backend for s in run.options.expect_services} | {a.served_by for a in traced}
                      | {str(r.get("name")) for r in run.backends()})
    # A backend's stdout reaches its babysitter's log through a pipe, a moment after the answer:
    # read again (up to log_wait) while some request is not yet in the log of its backend.
    deadline = asyncio.get_running_loop().time() + run.options.log_wait
    while True:
        logs: dict[str, list[str]] = {}
        problems: list[str] = []
        for b in backends:
            lines, err = await _read_logs(run, b)
            if lines is None:
                if b in {a.served_by for a in traced} or run.record(b) is not None:
                    problems.append(err or f"no log for {b}")
            else:
                logs[b] = lines
        pending = [a for a in traced if a.served_by in logs and not _log_has(logs[a.served_by], a.request_id)]
        if not pending or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.2)
    for a in traced:
        where = [b for b, lines in logs.items() if _log_has(lines, a.request_id)]
        if a.served_by in logs and a.served_by not in where:
            problems.append(f"request {a.request_id} served by {a.served_by} is not in its log")
        others = [b for b in where if b != a.served_by]
        if others:
            problems.append(f"request {a.request_id} served by {a.served_by} also appears in the log of {', '.join(others)}")
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        return CheckResult(8, name, False, "; ".join(shown))
    per = Counter(a.served_by for a in traced)
    return CheckResult(8, name, True, f"{len(traced)} request ids each found in the log of the backend that "
                                      f"served it and in no other (" + ", ".join(f"{b} {c}" for b, c in sorted(per.items())) + ")")


async def check_unknown_model(run: _Run) -> CheckResult:
    name = "unknown model"
    if run.router is None:
        return CheckResult(9, name, False, run.router_note or "no router")
    model = f"no-such-model-{run.run_id}"
    try:
        status, body = await _post_json(run, f"{run.router}/v1/chat/completions",
                                        {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return CheckResult(9, name, False, f"{type(exc).__name__}: {exc}")
    if status != 404:
        return CheckResult(9, name, False, f"model {model!r} got HTTP {status}, expected 404: {_short(body)}")
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message")):
        return CheckResult(9, name, False, f"404 without the OpenAI error envelope: {_short(body)}")
    return CheckResult(9, name, True, f"404 {_error_message(body)}")


def _chaos_target(run: _Run) -> tuple[ExpectedService | None, str]:
    opts = run.options
    if opts.chaos_service:
        for s in opts.expect_services:
            if opts.chaos_service in (s.name, s.backend):
                return s, ""
        return None, f"--chaos-service {opts.chaos_service} is not an expected service"
    for s in reversed(opts.expect_services):
        models = run.models_of(s.backend)
        if models and all(len(run.backends_for_model(m)) >= 2 for m in models):
            return s, ""
    return None, "no expected backend has a peer serving the same models, so stopping one would break service"


async def _wait_record(run: _Run, name: str, want_running: bool, deadline: float) -> dict | None:
    """Poll the registry until `name` is (or is no longer) running and healthy; the record or None."""
    while True:
        await _refresh_records(run)
        rec = run.record(name)
        running = rec is not None and rec.get("status") == "running" and bool(rec.get("is_healthy"))
        if running == want_running:
            return rec if rec is not None else {"name": name, "status": "absent"}
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


async def check_chaos(run: _Run) -> CheckResult:
    name = "chaos: stop a backend"
    if run.router is None:
        return CheckResult(10, name, False, run.router_note or "no router")
    await _refresh_records(run)
    target, why = _chaos_target(run)
    if target is None:
        return CheckResult(10, name, False, why)
    backend = target.backend
    models = run.models_of(backend)
    url = run.babysitter_url(backend)
    if url is None:
        return CheckResult(10, name, False, f"no babysitter URL for {backend} in the registry")
    headers = {"Authorization": f"Bearer {run.options.token}"} if run.options.token else {}
    try:
        status, body = await _post_json(run, f"{url}/stop", headers=headers)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return CheckResult(10, name, False, f"POST {url}/stop: {type(exc).__name__}: {exc}")
    if status >= 300:
        return CheckResult(10, name, False, f"POST {url}/stop answered {status}: {_short(body)}")
    problems: list[str] = []
    sent = 0
    failed: list[str] = []
    served: Counter[str] = Counter()
    after_down: Counter[str] = Counter()
    down = asyncio.Event()
    done = asyncio.Event()

    async def send_requests() -> None:
        # Keep traffic going for the target's models through the stop, the outage and the start.
        nonlocal sent
        i = 0
        while not done.is_set():
            ans = await _chat(run, models[i % len(models)], stream=(i % 2 == 1), tag="chaos")
            i += 1
            sent += 1
            if ans.error:
                failed.append(ans.error)
            else:
                served[ans.served_by or "?"] += 1
                if down.is_set():
                    after_down[ans.served_by or "?"] += 1

    sender = asyncio.create_task(send_requests())
    t0 = time.monotonic()
    down_after: float | None = None
    down_state: Any = None
    t1 = t0
    try:
        rec = await _wait_record(run, backend, False, t0 + run.options.chaos_timeout)
        if rec is None:
            problems.append(f"the registry still shows {backend} running {run.options.chaos_timeout:g} s after POST /stop")
        else:
            down_after, down_state = time.monotonic() - t0, rec.get("status")
            down.set()
            # Let the registry settle on the stopped state, with traffic still flowing.
            settled = time.monotonic() + run.options.chaos_timeout
            while time.monotonic() < settled and (sum(after_down.values()) < 4 * len(models)
                                                  or (run.record(backend) or {}).get("status") == "stopping"):
                await asyncio.sleep(0.1)
                await _refresh_records(run)
            down_state = (run.record(backend) or {}).get("status", "absent")
    finally:
        t1 = time.monotonic()
        try:
            status, body = await _post_json(run, f"{url}/start", headers=headers)
            if status >= 300:
                problems.append(f"POST {url}/start answered {status}: {_short(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problems.append(f"POST {url}/start: {type(exc).__name__}: {exc}")
        back = await _wait_record(run, backend, True, time.monotonic() + run.options.chaos_timeout)
        up_after = time.monotonic() - t1
        done.set()
        await sender
    if back is None:
        problems.append(f"{backend} is not running again {run.options.chaos_timeout:g} s after POST /start")
    if failed:
        problems.insert(0, f"{len(failed)} of {sent} requests failed around the stop of {backend} ({failed[0]})")
    if problems:
        return CheckResult(10, name, False, "; ".join(problems))
    by = ", ".join(f"{b} {c}" for b, c in sorted(served.items()))
    return CheckResult(10, name, True, f"stopped {backend} through its babysitter: the registry showed it not running "
                                       f"after {down_after:.1f} s (then {down_state!r}); started again, running after "
                                       f"{up_after:.1f} s; all {sent} requests sent meanwhile succeeded ({by})")


async def _find_router(run: _Run) -> None:
    if run.options.router:
        run.router = run.options.router.rstrip("/")
        return
    await _refresh_records(run)
    if run.registry_error:
        run.router_note = f"no router given and the registry cannot tell: {run.registry_error}"
        return
    routers = [r for r in run.records if _meta(r).get("type") == "router"]
    healthy = [r for r in routers if r.get("is_healthy")] or routers
    for r in healthy:
        url = _meta(r).get("url") or r.get("url")
        if isinstance(url, str) and url:
            run.router = url.rstrip("/")
            others = len(routers) - 1
            run.router_note = f"found in the registry as {r.get('name')}" + (f", {others} more router(s)" if others else "")
            return
    run.router_note = ("no router is registered in the registry (no record with metadata.type = 'router'); "
                       "give --router URL")


async def _wait_discovery(run: _Run) -> None:
    deadline = time.monotonic() + run.options.wait
    while time.monotonic() < deadline:
        await _refresh_records(run)
        if not _discovery_problems(run) and (run.options.router or any(_meta(r).get("type") == "router" for r in run.records)):
            return
        await asyncio.sleep(0.25)


async def run_checks(options: ValidateOptions) -> AsyncIterator[CheckResult]:
    """Run every check against the deployment, yielding each result as soon as it is known."""
    async with aiohttp.ClientSession() as session:
        run = _Run(options=options, session=session)
        if options.wait > 0:
            await _wait_discovery(run)
        yield await check_registry(run)
        await _find_router(run)
        yield await check_router(run)
        yield await check_discovery(run)
        yield await check_aggregation(run)
        yield await check_chat(run, stream=False)
        yield await check_chat(run, stream=True)
        yield await check_balance(run)
        yield await check_logs(run)
        yield await check_unknown_model(run)
        if options.chaos:
            yield await check_chaos(run)


# --- command line ----------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def _url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise argparse.ArgumentTypeError(f"expected an http:// URL, got {value!r}")
    return value.rstrip("/")


def parse_services(text: str) -> tuple[ExpectedService, ...]:
    """`NAME[:MODEL[+MODEL...]],...` -> expected services."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, models = item.partition(":")
        if not name or "/" in name:
            raise UsageError(f"bad service {item!r} in --expect-services (NAME or NAME:MODEL[+MODEL])")
        out.append(ExpectedService(name, tuple(m for m in models.split("+") if m)))
    if not out:
        raise UsageError("--expect-services needs at least one NAME")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinilm-svc validate",
                                description="Check a running deployment, found through its registry.")
    p.add_argument("--registry", type=_url, default=ValidateOptions.registry, help="registry URL (default %(default)s)")
    p.add_argument("--router", type=_url, help="router URL (default: the router registered in the registry)")
    p.add_argument("--expect-services", default="babysitter-a:model-1,babysitter-b:model-2,babysitter-c:model-1,babysitter-d:model-2",
                   help="babysitters that must be registered, each NAME[:MODEL[+MODEL]] (default: the demo's)")
    p.add_argument("--expect-models", help="comma list of the models the router must list (default: those of --expect-services)")
    p.add_argument("--expect-hosts", default="2",
                   help="a number of distinct hosts, or a comma list of addresses, the expected records must come from (default 2)")
    p.add_argument("--lb-requests", type=int, default=8, help="requests per model for the load-balancing check (default 8)")
    p.add_argument("--log-tail", type=int, default=2000, help="log lines read from each babysitter (default 2000)")
    p.add_argument("--log-wait", type=float, default=5.0,
                   help="seconds a request may take to appear in its backend's log (default 5)")
    p.add_argument("--chaos", action="store_true", help="also stop one backend through its babysitter, check nothing fails, start it again")
    p.add_argument("--chaos-service", help="the babysitter to stop with --chaos (default: the last one with a peer)")
    p.add_argument("--token", help="babysitter token for POST /stop and /start")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP request (default 10)")
    p.add_argument("--wait", type=float, default=0.0, help="first wait up to this many seconds for every expected record to be healthy")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return p


def options_from_args(args: argparse.Namespace) -> ValidateOptions:
    """Turn parsed arguments into ValidateOptions; raises UsageError on bad values."""
    services = parse_services(args.expect_services)
    models = tuple(m.strip() for m in args.expect_models.split(",") if m.strip()) if args.expect_models else None
    hosts: tuple[str, ...] = ()
    text = args.expect_hosts.strip()
    if text.isdigit():
        count = int(text)
    else:
        hosts = tuple(h.strip() for h in text.split(",") if h.strip())
        count = len(hosts)
    if args.lb_requests < 2:
        raise UsageError("--lb-requests must be at least 2")
    if args.log_tail < 1 or args.timeout <= 0 or args.wait < 0 or args.log_wait < 0:
        raise UsageError("--log-tail, --timeout must be positive and --wait, --log-wait not negative")
    return ValidateOptions(registry=args.registry, router=args.router, expect_services=services,
                           expect_models=models, expect_hosts=hosts, expect_host_count=count,
                           lb_requests=args.lb_requests, log_tail=args.log_tail, log_wait=args.log_wait,
                           chaos=args.chaos,
                           chaos_service=args.chaos_service, token=args.token, timeout=args.timeout,
                           wait=args.wait)


def format_row(result: CheckResult, width: int = 100) -> str:
    """One table row; long details wrap under the detail column."""
    head = f"{result.number:>3}  {result.name:<22} {'PASS' if result.passed else 'FAIL':<6} "
    lines = textwrap.wrap(result.detail, max(30, width - len(head)), break_on_hyphens=False) or [""]
    return "\n".join([head + lines[0]] + [" " * len(head) + line for line in lines[1:]])


def summary_line(results: list[CheckResult]) -> str:
    passed = sum(r.passed for r in results)
    return f"{passed} passed, {len(results) - passed} failed"


async def _run_cli(options: ValidateOptions, as_json: bool) -> int:
    import shutil

    width = shutil.get_terminal_size((110, 24)).columns
    results: list[CheckResult] = []
    if not as_json:
        print(f"validating the deployment of registry {options.registry}")
        print(f"{'#':>3}  {'check':<22} {'result':<6} detail")
    async for result in run_checks(options):
        results.append(result)
        if not as_json:
            print(format_row(result, width), flush=True)
    if as_json:
        passed = sum(r.passed for r in results)
        print(json.dumps({"registry": options.registry, "checks": [asdict(r) for r in results],
                          "passed": passed, "failed": len(results) - passed}, indent=2))
    else:
        print(summary_line(results))
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    """`infinilm-svc validate ...`: 0 when every check passes, 1 on any failure, 2 on usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        options = options_from_args(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"infinilm-svc validate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run_cli(options, args.json))
    except KeyboardInterrupt:
        return EXIT_FAIL
