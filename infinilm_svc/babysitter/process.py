"""The backend child process: its command line, its own process group, its output and its stop."""
from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from ..config.babysitter import LLAMA_SERVER, BabysitterConfig, BackendConfig
from ..runtime import self_command
from .logbook import CUT_MARK, MAX_LINE, LogBook

WILDCARDS = ("", "0.0.0.0", "::", "[::]")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when the babysitter dies, even by kill -9.

    Linux only (prctl PR_SET_PDEATHSIG; it survives the exec of the backend's program). libc is
    looked up here, in the parent: nothing but the system call runs in the forked child.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the babysitter died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


@dataclass(frozen=True)
class LaunchSpec:
    """What to exec: argv, full environment and working directory."""

    argv: tuple[str, ...]
    env: dict
    cwd: str | None


def probe_host(config: BabysitterConfig) -> str:
    """Where the babysitter reaches its own backend: loopback, or the bind address if specific."""
    return "127.0.0.1" if config.bind in WILDCARDS else config.bind


def launch_spec(config: BabysitterConfig) -> LaunchSpec:
    """The backend's command line for each backend type (as upstream builds it, with `args` never re-split)."""
    b = config.backend
    port = str(config.port)
    listen = config.bind or "0.0.0.0"
    args = list(b.args)
    if b.type == "mock":
        argv = self_command() + ["mock", "--name", b.mock_name or config.service_name, "--port", port,
                                 "--models", ",".join(b.models), "--host", listen, *b.mock_options, *args]
    elif b.type == "command":
        argv = shlex.split(b.command or "") + args
    elif b.type == "vllm":
        argv = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", b.model or "",
                "--port", port, "--host", listen, *args]
    elif b.type == "infinilm-rust":
        argv = ["xtask", "service", b.config_file or "", "-p", port, *args]
    elif b.type == "llama.cpp":
        argv = shlex.split(b.command or LLAMA_SERVER) + ["--model", b.model_path or "",
                                                         "--host", listen, "--port", port]
        if b.models and not ({"-a", "--alias"} & {a.split("=", 1)[0] for a in args}):
            argv += ["--alias", b.models[0]]   # the served name; else the engine's own (its file path)
        argv += args
    elif b.type == "infinilm":
        argv = ["python3", "launch_server.py", "--port", port, "--host", listen, *args]
    else:  # the config check rejects other types
        raise ValueError(f"unknown backend type {b.type!r}")
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in b.env.items()})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return LaunchSpec(tuple(argv), env, b.work_dir or None)


def llama_host_cache(b: BackendConfig) -> bool:
    """Whether llama-server keeps prompts in host memory beyond its slots: on unless its arguments
    (`--cache-ram N` / `-cram N`, last one wins) or LLAMA_ARG_CACHE_RAM set it to 0."""
    value = b.env.get("LLAMA_ARG_CACHE_RAM")
    args = list(b.args)
    for i, a in enumerate(args):
        name, eq, inline = a.partition("=")
        if name in ("--cache-ram", "-cram"):
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else value)
    try:
        return int(str(value).strip()) != 0 if value is not None else True
    except ValueError:
        return True


def signal_number(name: str) -> int:
    """`TERM`/`SIGTERM` -> signal.SIGTERM."""
    return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


class BackendProcess:
    """One running child in its own process group, its output pumped into the log book."""

    def __init__(self, proc: asyncio.subprocess.Process, logbook: LogBook) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started_at = time.time()
        self.logbook = logbook
        self._pumps = [asyncio.create_task(self._pump(proc.stdout, "stdout")),
                       asyncio.create_task(self._pump(proc.stderr, "stderr"))]
        self.exited = asyncio.create_task(self._wait())

    @classmethod
    async def spawn(cls, spec: LaunchSpec, logbook: LogBook) -> "BackendProcess":
        """Start the child (raises OSError if it cannot be executed)."""
        proc = await asyncio.create_subprocess_exec(
            *spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=spec.env, cwd=spec.cwd, start_new_session=True,
            preexec_fn=die_with_parent())
        return cls(proc, logbook)

    async def _wait(self) -> int:
        code = await self.proc.wait()
        # Whatever the child left behind in its group goes with it: no orphans holding the port.
        self._signal_group(signal.SIGKILL)
        return code

    async def _pump(self, reader: asyncio.StreamReader | None, stream: str) -> None:
        if reader is None:
            return
        pending = b""
        skipping = False  # inside an over-long line whose start is already logged (and marked cut)
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if skipping:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    skipping, chunk = False, chunk[nl + 1:]
                pending += chunk
                if b"\n" not in pending:
                    if len(pending) > MAX_LINE * 4:  # an endless line is cut, not buffered forever
                        self.logbook.add_lines(stream, [pending[:MAX_LINE * 4].decode("utf-8", "replace")[:MAX_LINE]
                                                        + CUT_MARK])
                        pending = b""
                        skipping = True
                    continue
                *lines, pending = pending.split(b"\n")
                self.logbook.add_lines(stream, [ln.decode("utf-8", "replace").rstrip("\r") for ln in lines])
        except (OSError, asyncio.CancelledError):
            pass
        if pending:
            self.logbook.add_lines(stream, [pending.decode("utf-8", "replace").rstrip("\r")])

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def kill_group(self) -> None:
        """KILL the whole group at once, without waiting (the babysitter is being forced out)."""
        if self.proc.returncode is None:
            self._signal_group(signal.SIGKILL)

    async def stop(self, sig: int, timeout: float) -> int:
        """Send `sig` to the whole group, wait up to `timeout`, then KILL the group; the exit code."""
        if self.proc.returncode is None:
            self._signal_group(sig)
            if sig != signal.SIGKILL:
                # A stopped (SIGSTOPped) backend only sees the signal once it runs again.
                self._signal_group(signal.SIGCONT)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except asyncio.TimeoutError:
                self.logbook.marker(f"backend did not stop within {timeout:g} s; killing it")
                self._signal_group(signal.SIGKILL)
        code = await self.exited
        await self.drain()
        return code

    async def drain(self, timeout: float = 1.0) -> None:
        """Let the output pumps finish (the pipes close when the group is gone)."""
        _, pending = await asyncio.wait(self._pumps, timeout=timeout)
        for t in pending:
            t.cancel()
