"""Which asyncio event loop a process runs on: uvloop where the platform has it, else asyncio's own.

`--loop auto` (the default, or the INFINILM_LOOP environment variable) picks uvloop when it can be
imported; `--loop asyncio` forces the standard loop; `--loop uvloop` fails when uvloop is missing.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any, Callable, Coroutine

LOOPS = ("auto", "asyncio", "uvloop")
log = logging.getLogger(__name__)


class LoopUnavailable(Exception):
    """`--loop uvloop` on a platform without uvloop."""


def default_loop() -> str:
    """The loop named by INFINILM_LOOP, or "auto"."""
    choice = os.environ.get("INFINILM_LOOP", "auto")
    return choice if choice in LOOPS else "auto"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for the chosen loop; None means asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise LoopUnavailable("--loop uvloop: uvloop is not installed for this Python") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, int], choice: str = "auto") -> int:
    """asyncio.run(main) on the chosen loop."""
    factory = loop_factory(choice)
    name = "uvloop" if factory is not None else "asyncio"
    log.debug("event loop: %s", name)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    if factory is not None:  # Python 3.10: no Runner; the policy decides the loop
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(main)


def current_loop_name() -> str:
    """"uvloop" or "asyncio": what the running loop is (for /health and logs)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
