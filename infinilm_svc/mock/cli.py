"""`infinilm-svc mock ...`: run one mock OpenAI backend in the foreground."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..loops import LOOPS, LoopUnavailable, default_loop, run
from .options import MockOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinilm-svc mock",
                                description="A mock OpenAI-compatible backend whose answers name who served them.")
    p.add_argument("--name", required=True, help="service name used in answers (Hello from NAME)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", required=True, help="comma-separated model ids")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds before the first token")
    p.add_argument("--chunks", type=int, default=None, metavar="N", help="streamed content chunks (default: one per word)")
    p.add_argument("--chunk-interval", type=float, default=0.0, metavar="S", help="seconds between chunks")
    p.add_argument("--fail-rate", type=float, default=0.0, metavar="F", help="fraction of inference requests answered 500")
    p.add_argument("--crash-after", type=int, default=None, metavar="N", help="exit with code 3 on request N+1")
    p.add_argument("--hang-after", type=int, default=None, metavar="N", help="never answer request N+1 or any later one")
    p.add_argument("--die-mid-stream-after", type=int, default=None, metavar="N",
                   help="drop the connection after N content chunks of every answer (half the body when not streamed)")
    p.add_argument("--startup-delay", type=float, default=0.0, metavar="S", help="seconds before listening")
    p.add_argument("--embedding-dim", type=int, default=16, metavar="N")
    p.add_argument("--slots", type=int, default=0, metavar="N",
                   help="behave like an engine with N slots and a prompt cache: requests run N at a time, "
                        "`id_slot` picks the slot, cached prompt tokens are reported (default 0: no slots)")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.0, metavar="MS",
                   help="with --slots: time per prompt token not in the slot's cache")
    p.add_argument("--no-embeddings", action="store_true",
                   help="answer 501 to embeddings requests, as llama-server started without --embeddings")
    p.add_argument("--strict-fields", action="store_true",
                   help="answer 400 to request fields OpenAI does not define (such as id_slot)")
    p.add_argument("--loop", default=default_loop(), choices=LOOPS, help="event loop (default: uvloop where available)")
    # Accepted for compatibility with the upstream mock_service.py; the babysitter registers it.
    p.add_argument("--registry-url", default=None, help=argparse.SUPPRESS)
    return p


def parse_options(argv: list[str]) -> MockOptions:
    """Parse the flags into MockOptions (argparse exits with code 2 on bad usage)."""
    p = _parser()
    a = p.parse_args(argv)
    models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if not models:
        p.error("--models needs at least one model id")
    if not 0 < a.port < 65536:
        p.error(f"--port must be 1..65535, got {a.port}")
    if not 0.0 <= a.fail_rate <= 1.0:
        p.error(f"--fail-rate must be between 0 and 1, got {a.fail_rate}")
    for flag in ("chunks", "embedding_dim"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    for flag in ("crash_after", "hang_after", "die_mid_stream_after"):
        if getattr(a, flag) is not None and getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if a.slots < 0:
        p.error(f"--slots must be >= 0, got {a.slots}")
    for flag in ("latency", "chunk_interval", "startup_delay", "prefill_ms_per_token"):
        if getattr(a, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0")
    return MockOptions(name=a.name, port=a.port, models=models, host=a.host, latency=a.latency,
                       chunks=a.chunks, chunk_interval=a.chunk_interval, fail_rate=a.fail_rate,
                       crash_after=a.crash_after, hang_after=a.hang_after, startup_delay=a.startup_delay,
                       die_mid_stream_after=a.die_mid_stream_after,
                       embedding_dim=a.embedding_dim, slots=a.slots, prefill_ms_per_token=a.prefill_ms_per_token,
                       strict_fields=a.strict_fields, no_embeddings=a.no_embeddings)


async def _run(options: MockOptions) -> int:
    from ..runtime import HostedApp, serve
    from .app import create_app

    if options.startup_delay > 0:
        print(f"mock {options.name}: waiting {options.startup_delay:g} s before listening", flush=True)
        await asyncio.sleep(options.startup_delay)
    app = create_app(options)

    def listening() -> None:
        print(f"mock {options.name}: serving {','.join(options.models)} on http://{options.host}:{options.port}",
              flush=True)

    return await serve([HostedApp("mock", options.name, app, options.host, options.port)], on_listening=listening)


def main(argv: list[str]) -> int:
    """Run the mock until SIGTERM/SIGINT; exit 1 if it cannot listen, 2 on bad usage."""
    options = parse_options(argv)
    loop = _parser().parse_args(argv).loop
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(_run(options), loop)
    except LoopUnavailable as exc:
        print(f"mock: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1
