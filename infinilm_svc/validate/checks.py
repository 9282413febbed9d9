"""The checks, numbered as the table shows them, and run_checks, which runs them in order."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import math
import os
import re
import sys
import time
from collections import Counter
from typing import Any, AsyncIterator, Iterable

import aiohttp

from ..client.babysitter import BabysitterClient, BabysitterError
from ..client.registry import registry_urls
from .deployment import (
    Run,
    chat,
    engine_tokens,
    error_message,
    find_router,
    metadata_of,
    refresh_records,
    request_json,
    shorten,
)
from .options import CheckResult, ExpectedService, ValidateOptions


def fair_share(requests: int, backends: int) -> int:
    """The fewest requests each of `backends` must serve out of `requests`: half an even split, rounded up."""
    if backends <= 0:
        return 0
    return math.ceil(requests / (2 * backends))


def connection_problem(exc: BaseException) -> str:
    """A failed connection in a few plain words: `connection refused`, `timed out`, ..."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer (timed out)"
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, OSError) and os_error.errno:
        if os_error.errno == errno.ECONNREFUSED:
            return "connection refused (nothing listens there)"
        return os.strerror(os_error.errno).lower()
    return f"{type(exc).__name__}: {exc}"


async def check_registry(run: Run) -> CheckResult:
    name = "registry health"
    url = run.options.registry.rstrip("/")
    try:
        status, body = await request_json(run, "GET", url + "/health")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        run.registry_error = f"cannot reach the registry at {url}: {connection_problem(exc)}"
        return CheckResult(1, name, False, run.registry_error + ("" if run.options.router else
                                                                 "; the other checks need it (or --router URL)"))
    if status != 200 or not isinstance(body, dict) or body.get("status") != "healthy":
        return CheckResult(1, name, False, f"GET {url}/health answered {status}: {shorten(body)}")
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


async def check_router(run: Run) -> CheckResult:
    name = "router health"
    if run.router is None:
        return CheckResult(2, name, False, run.router_note or "no router to check")
    try:
        status, body = await request_json(run, "GET", run.router + "/health")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        detail = f"cannot reach the router at {run.router}: {type(exc).__name__}: {exc}"
        run.router_note = f"skipped: the router at {run.router} is unreachable (check 2)"
        run.router = None
        return CheckResult(2, name, False, detail)
    if status != 200 or not isinstance(body, dict):
        return CheckResult(2, name, False, f"GET {run.router}/health answered {status}: {shorten(body)}")
    healthy = _healthy_count(body.get("healthy_services"))
    if healthy is None or healthy < 1:
        return CheckResult(2, name, False, f"{run.router} has no healthy backend "
                                           f"(healthy_services={body.get('healthy_services')!r}, status={body.get('status')!r})")
    note = f" ({run.router_note})" if run.router_note else ""
    problems = await _other_router_problems(run, body.get("healthy_services"))
    # With --wait, routers that have not yet caught up with the registry are given that long.
    deadline = time.monotonic() + run.options.wait
    while problems and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        status, body = await request_json(run, "GET", run.router + "/health")
        if status != 200 or not isinstance(body, dict):
            break
        problems = await _other_router_problems(run, body.get("healthy_services"))
    if problems:
        return CheckResult(2, name, False, f"{run.router}: {body.get('healthy_services')} backends healthy, but "
                                           + "; ".join(problems))
    also = f"; the other {len(run.other_routers)} router(s) agree" if run.other_routers else ""
    return CheckResult(2, name, True, f"{run.router}: {body.get('healthy_services')} backends healthy{also}{note}")


async def _other_router_problems(run: Run, expected: Any) -> list[str]:
    """Every other registered router must answer /health and see the same healthy backends."""
    problems = []
    for url in run.other_routers:
        try:
            status, body = await request_json(run, "GET", url + "/health")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problems.append(f"router {url} is unreachable: {type(exc).__name__}: {exc}")
            continue
        if status != 200 or not isinstance(body, dict):
            problems.append(f"router {url} answered {status}: {shorten(body)}")
        elif body.get("healthy_services") != expected:
            problems.append(f"router {url} sees {body.get('healthy_services')} backends healthy")
    return problems


def _discovery_problems(run: Run) -> list[str]:
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
            meta = metadata_of(rec)
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


async def check_discovery(run: Run) -> CheckResult:
    name = "discovery"
    await refresh_records(run)
    problems = _discovery_problems(run)
    n = len(run.options.expect_services)
    if problems:
        return CheckResult(3, name, False, "; ".join(problems))
    hosts = sorted({str(run.record(s.backend).get("host")) for s in run.options.expect_services})  # type: ignore[union-attr]
    return CheckResult(3, name, True, f"{n} babysitters and {n} backends registered and healthy, "
                                      f"on {len(hosts)} hosts ({', '.join(hosts)})")


async def check_aggregation(run: Run) -> CheckResult:
    name = "model aggregation"
    if run.router is None:
        return CheckResult(4, name, False, run.router_note or "no router")
    expected = set(run.options.models)
    problems = []
    for path in ("/models", "/v1/models"):
        try:
            status, body = await request_json(run, "GET", run.router + path)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problems.append(f"GET {path}: {type(exc).__name__}: {exc}")
            continue
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
            problems.append(f"GET {path} answered {status}: {shorten(body)}")
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


async def check_chat(run: Run, stream: bool) -> CheckResult:
    number, name = (6, "chat (streaming)") if stream else (5, "chat")
    if run.router is None:
        return CheckResult(number, name, False, run.router_note or "no router")
    if not run.options.models:
        return CheckResult(number, name, False, "no expected models to ask for")
    good, bad = [], []
    for model in run.options.models:
        ans = await chat(run, model, stream, "stream" if stream else "chat")
        serving = run.backends_for_model(model)
        if ans.error:
            bad.append(f"{model}: {ans.error}")
        elif ans.served_by not in serving:
            bad.append(f"{model}: answered by {(ans.served_by or '-').lstrip('?')}, which does not serve it "
                       f"(expected one of {', '.join(serving) or 'none'})")
        else:
            good.append(f"{model} -> {ans.served_by}")
    if bad:
        return CheckResult(number, name, False, "; ".join(bad))
    return CheckResult(number, name, True, ", ".join(good))


async def check_balance(run: Run) -> CheckResult:
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
            ans = await chat(run, model, stream=(i % 4 == 3), tag="lb")
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


async def _read_logs(run: Run, backend: str) -> tuple[list[str] | None, str | None]:
    url = run.babysitter_url(backend)
    if url is None:
        return None, f"no babysitter URL for {backend} in the registry"
    try:
        lines = await run.babysitters.tail(url, run.options.log_tail)
    except BabysitterError as exc:
        return None, f"{backend}: {exc}"
    return [entry.line for entry in lines], None


async def check_logs(run: Run) -> CheckResult:
    """Each request is traced to the backend that served it, by that backend's own evidence.

    A backend that logs request ids (the mock, or a server logging X-Request-ID) must show each
    request id in its own log and in no other. A real engine does not log request ids; then its own
    generated-token counter (llama-server's /metrics) must have grown by exactly the completion
    tokens of the answers the router says it served, and by nothing on its peers.
    """
    name = "request logs"
    if run.router is None:
        return CheckResult(8, name, False, run.router_note or "no router")
    await refresh_records(run)
    backends = sorted({s.backend for s in run.options.expect_services} | {str(r.get("name")) for r in run.backends()})
    before = {b: (await engine_tokens(run, b))[0] for b in backends}
    # Fresh requests too, so the check stands on its own when run alone.
    fresh = [await chat(run, model, stream, "log") for model in run.options.models for stream in (False, True)]
    traced = [a for a in run.answers if a.error is None and a.served_by and not a.served_by.startswith("?")]
    if not traced:
        return CheckResult(8, name, False, "no request was answered by a known backend, nothing to trace")
    backends = sorted(set(backends) | {a.served_by for a in traced if a.served_by is not None})
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
        marker = f"id=validate-{run.run_id}-"
        id_logging = {b for b, lines in logs.items() if any(marker in ln for ln in lines)}
        pending = [a for a in traced if a.served_by in id_logging and not _log_has(logs[a.served_by], a.request_id)]
        if not pending or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(0.2)
    by_log = [a for a in traced if a.served_by in id_logging]
    for a in by_log:
        where = [b for b, lines in logs.items() if _log_has(lines, a.request_id)]
        if a.served_by in logs and a.served_by not in where:
            problems.append(f"request {a.request_id} served by {a.served_by} is not in its log")
        others = [b for b in where if b != a.served_by]
        if others:
            problems.append(f"request {a.request_id} served by {a.served_by} also appears in the log of {', '.join(others)}")
    # Backends whose log names no request: the engine's own counters must account for the fresh answers.
    counted = [b for b in backends if b not in id_logging and b in logs]
    by_counter: Counter[str] = Counter()
    want: dict[str, int] = {}
    for b in counted:
        served = [a for a in fresh if a.error is None and a.served_by == b]
        if any(a.completion_tokens is None for a in served):
            problems.append(f"{b} logs no request ids and an answer it served reported no usage to count")
            continue
        want[b] = sum(a.completion_tokens or 0 for a in served)
        by_counter[b] = len(served)
    # The engine counts a request when it finishes it, which may be a moment after the answer.
    deadline = asyncio.get_running_loop().time() + run.options.log_wait
    while want:
        wrong = []
        for b, n in sorted(want.items()):
            after, err = await engine_tokens(run, b)
            start = before.get(b)
            if (start is None or after is None) and n == 0 and not by_counter[b]:
                continue   # it served none of them and keeps no counters: nothing to account for
            if start is None or after is None:
                wrong.append(f"{b} logs no request ids and its engine counters cannot be read: {err}")
            elif after - start != n:
                wrong.append(f"{b}'s engine generated {after - start:g} tokens during this check, but the "
                             f"answers the router attributed to it (X-InfiniLM-Backend) carry {n}")
        if not wrong or asyncio.get_running_loop().time() >= deadline:
            problems += wrong
            break
        await asyncio.sleep(0.2)
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        return CheckResult(8, name, False, "; ".join(shown))
    parts = []
    if by_log:
        per = Counter(a.served_by for a in by_log)
        parts.append(f"{len(by_log)} request ids each found in the log of the backend that served it and in no "
                     f"other (" + ", ".join(f"{b} {c}" for b, c in sorted(per.items())) + ")")
    metered = [b for b in counted if before.get(b) is not None]
    if metered:
        parts.append(f"{sum(by_counter[b] for b in metered)} answers matched by the engines' own generated-token "
                     f"counters (" + ", ".join(f"{b} {by_counter[b]}" for b in metered) + ")")
    return CheckResult(8, name, True, "; ".join(parts))


async def check_unknown_model(run: Run) -> CheckResult:
    name = "unknown model"
    if run.router is None:
        return CheckResult(9, name, False, run.router_note or "no router")
    model = f"no-such-model-{run.run_id}"
    try:
        status, body = await request_json(run, "POST", f"{run.router}/v1/chat/completions",
                                        {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return CheckResult(9, name, False, f"{type(exc).__name__}: {exc}")
    if status != 404:
        return CheckResult(9, name, False, f"model {model!r} got HTTP {status}, expected 404: {shorten(body)}")
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message")):
        return CheckResult(9, name, False, f"404 without the OpenAI error envelope: {shorten(body)}")
    return CheckResult(9, name, True, f"404 {error_message(body)}")


def _chaos_target(run: Run) -> tuple[ExpectedService | None, str]:
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


async def _wait_record(run: Run, name: str, want_running: bool, deadline: float) -> dict | None:
    """Poll the registry until `name` is (or is no longer) running and healthy; the record or None."""
    while True:
        await refresh_records(run)
        rec = run.record(name)
        running = rec is not None and rec.get("status") == "running" and bool(rec.get("is_healthy"))
        if running == want_running:
            return rec if rec is not None else {"name": name, "status": "absent"}
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.2)


async def check_chaos(run: Run) -> CheckResult:
    name = "chaos: stop a backend"
    if run.router is None:
        return CheckResult(10, name, False, run.router_note or "no router")
    await refresh_records(run)
    target, why = _chaos_target(run)
    if target is None:
        return CheckResult(10, name, False, why)
    backend = target.backend
    models = run.models_of(backend)
    url = run.babysitter_url(backend)
    if url is None:
        return CheckResult(10, name, False, f"no babysitter URL for {backend} in the registry")
    try:
        await run.babysitters.act(url, "stop")
    except BabysitterError as exc:
        return CheckResult(10, name, False, f"{url}: {exc}")
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
            ans = await chat(run, models[i % len(models)], stream=(i % 2 == 1), tag="chaos")
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
                await refresh_records(run)
            down_state = (run.record(backend) or {}).get("status", "absent")
    finally:
        t1 = time.monotonic()
        try:
            await run.babysitters.act(url, "start")
        except BabysitterError as exc:
            problems.append(f"{url}: {exc}")
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


# The checks after the first, by number and name, as they are reported when they cannot run.
NEEDS_REGISTRY = ((2, "router health"), (3, "discovery"), (4, "model aggregation"), (5, "chat"),
                  (6, "chat (streaming)"), (7, "load balancing"), (8, "request logs"), (9, "unknown model"),
                  (10, "chaos: stop a backend"))


async def _wait_discovery(run: Run) -> None:
    deadline = time.monotonic() + run.options.wait
    while time.monotonic() < deadline:
        await refresh_records(run)
        if not _discovery_problems(run) and (run.options.router or any(metadata_of(r).get("type") == "router" for r in run.records)):
            return
        await asyncio.sleep(0.25)


async def pick_registry(session: aiohttp.ClientSession, urls: list[str]) -> tuple[str, list[str]]:
    """The first of several registries that answers /health, and a note per one that did not."""
    notes: list[str] = []
    for url in urls:
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=3, sock_connect=0.5)) as resp:
                if resp.status == 200:
                    return url, notes
                notes.append(f"{url} answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            notes.append(f"{url}: {type(exc).__name__}: {exc}")
    return urls[0], notes


async def run_checks(options: ValidateOptions) -> AsyncIterator[CheckResult]:
    """Run every check against the deployment, yielding each result as soon as it is known."""
    async with aiohttp.ClientSession() as session:
        urls = registry_urls(options.registry)
        if len(urls) > 1:
            # Several registries: check the deployment through the first one that answers.
            chosen, notes = await pick_registry(session, urls)
            for note in notes:
                print(f"validate: registry {note}; trying the next", file=sys.stderr)
            options = dataclasses.replace(options, registry=chosen)
        run = Run(options=options, session=session,
                  babysitters=BabysitterClient(session, options.token, timeout=options.timeout))
        if options.wait > 0:
            await _wait_discovery(run)
        first = await check_registry(run)
        yield first
        if not first.passed and run.registry_error and not options.router:
            # Without the registry there is no router to find and nothing to check against: say the
            # connection error once (check 1), and mark the rest as not run rather than repeat it.
            for number, name in NEEDS_REGISTRY:
                if number != 10 or options.chaos:
                    yield CheckResult(number, name, False, "not run: needs the registry (check 1)", ran=False)
            return
        await find_router(run)
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
