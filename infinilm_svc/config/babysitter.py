"""An upstream babysitter file, accepted unchanged, plus our optional keys."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, overload

from .schema import check_port, check_positive, check_url, check_urls

BACKEND_TYPES = ("command", "mock", "vllm", "infinilm-rust", "infinilm", "llama.cpp")
LLAMA_SERVER = "llama-server"         # the program of type = "llama.cpp" when `command` is not set
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class SupervisionConfig:
    """The `[babysitter]` table: restart policy, heartbeats and probes (supervisord vocabulary)."""

    max_restarts: int = 10000         # quick failures in a row before FATAL
    restart_delay: float = 5.0        # first back-off; doubles up to backoff_max
    heartbeat_interval: float = 30.0
    backoff_max: float = 60.0
    startsecs: float = 60.0           # up this long = a stable run; resets the failure counter
    ready_timeout: float = 900.0      # not ready in this long = kill and restart (real LLMs load slowly)
    health_interval: float = 1.0      # liveness probe period once running
    health_timeout: float = 2.0       # a probe unanswered this long: UNRESPONSIVE (hang seen in <= 3 s)
    liveness_failures: int = 3        # consecutive failed probes before a restart
    stop_timeout: float = 10.0        # stopwaitsecs: TERM, wait this long, then KILL
    stopsignal: str = "TERM"
    log_file: str | None = None       # default: <name>.log in log_dir
    log_dir: str = "logs"
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    log_ring_lines: int = 2000
    log_ring_bytes: int = 4 * 1024 * 1024   # the in-memory ring is bounded by this too

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.max_restarts < 0:
            out.append(("max_restarts", f"max_restarts must be >= 0, got {self.max_restarts}"))
        for name in ("heartbeat_interval", "ready_timeout", "health_interval", "health_timeout", "backoff_max"):
            if (m := check_positive(getattr(self, name), name)):
                out.append((name, m))
        for name in ("restart_delay", "startsecs", "stop_timeout"):
            if (m := check_positive(getattr(self, name), name, allow_zero=True)):
                out.append((name, m))
        if self.liveness_failures < 1:
            out.append(("liveness_failures", f"liveness_failures must be >= 1, got {self.liveness_failures}"))
        if self.stopsignal.upper().removeprefix("SIG") not in ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2"):
            out.append(("stopsignal", f"unknown signal {self.stopsignal!r} (TERM, INT, QUIT, HUP, KILL, USR1, USR2)"))
        for name in ("log_max_bytes", "log_backups"):
            if getattr(self, name) < 0:
                out.append((name, f"{name} must be >= 0, got {getattr(self, name)}"))
        if self.log_ring_lines < 10:
            out.append(("log_ring_lines", f"log_ring_lines must be >= 10, got {self.log_ring_lines}"))
        if self.log_ring_bytes < 65536:
            out.append(("log_ring_bytes", f"log_ring_bytes must be >= 65536, got {self.log_ring_bytes}"))
        return out


@dataclass(frozen=True)
class BackendConfig:
    """The `[backend]` table: what inference server to run."""

    type: str
    command: str | None = None        # command: program (split like a shell would); llama.cpp: llama-server
    args: tuple[str, ...] = ()        # passed as given, never re-split
    work_dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None          # vllm
    models: tuple[str, ...] = ()      # mock; or the declared models of a backend without a model list
    config_file: str | None = None    # infinilm-rust
    model_path: str | None = None     # infinilm; llama.cpp (a GGUF file)
    health_path: str | None = None    # readiness/liveness path for backends with no model list
    mock_options: tuple[str, ...] = ()  # extra `mock` flags for type = "mock" (e.g. ["--latency", "0.1"])
    mock_name: str | None = None      # the name a mock answers with (default: the babysitter's name)

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.type not in BACKEND_TYPES:
            out.append(("type", f"unknown backend type {self.type!r} (one of {', '.join(BACKEND_TYPES)})"))
            return out
        if self.type == "command" and (not self.command or not self.command.strip()):
            out.append(("command", 'type = "command" needs command = "program"'))
        elif self.type in ("command", "llama.cpp") and self.command is not None:
            if not self.command.strip():
                out.append(("command", "command must not be empty (leave it out to run llama-server from PATH)"))
            else:
                try:
                    shlex.split(self.command)
                except ValueError as exc:
                    out.append(("command", f"cannot split command: {exc}"))
        if self.type == "llama.cpp":
            if not self.model_path:
                out.append(("model_path", 'type = "llama.cpp" needs model_path = "/path/to/model.gguf"'))
            if len(self.models) > 1:
                out.append(("models", "llama-server serves one model: models takes at most one name "
                                      f"(its --alias), got {len(self.models)}"))
            if self.health_path:
                out.append(("health_path", 'type = "llama.cpp" is probed on the engine\'s own /health'))
            return out
        if self.health_path and not self.models:
            out.append(("health_path", 'health_path is for a backend without a model list: it needs models = ["..."]'))
        if self.mock_name is not None and (self.type != "mock" or not self.mock_name.strip()):
            out.append(("mock_name", 'mock_name is the non-empty name of a type = "mock" backend'))
        if self.type == "mock" and not self.models:
            out.append(("models", 'type = "mock" needs models = ["..."]'))
        if self.type == "vllm" and not self.model:
            out.append(("model", 'type = "vllm" needs model = "/path/or/name"'))
        if self.type == "infinilm-rust" and not self.config_file:
            out.append(("config_file", 'type = "infinilm-rust" needs config_file'))
        if self.type == "infinilm" and not self.model_path:
            out.append(("model_path", 'type = "infinilm" needs model_path'))
        return out


@overload
def _absolute(path: str, directory: str) -> str: ...


@overload
def _absolute(path: None, directory: str) -> None: ...


def _absolute(path: str | None, directory: str) -> str | None:
    """`path` with ~ and $VARIABLES expanded, taken from `directory` when relative."""
    if path is None:
        return None
    path = os.path.expanduser(os.path.expandvars(path))
    return path if os.path.isabs(path) else os.path.join(directory, path)


def gguf_problem(path: str) -> str | None:
    """Why `path` cannot be a model for llama-server (missing, unreadable, not GGUF), or None."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"model file {path}: {exc.strerror or exc}"
    if magic != GGUF_MAGIC:
        return f"model file {path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
    return None


@dataclass(frozen=True)
class BabysitterConfig:
    """One babysitter: the upstream file's top-level keys plus `bind` and `token` of ours."""

    port: int
    backend: BackendConfig
    name: str | None = None
    host: str = "localhost"           # the address others use to reach it (upstream meaning)
    bind: str = "0.0.0.0"             # where the babysitter's own HTTP API listens
    registry_url: str | tuple[str, ...] | None = None  # one URL, or several to fail over along
    router_url: str | None = None     # accepted for compatibility; unused, as upstream
    token: str | None = None          # registry token, also required by POST /restart|/stop|/start
    babysitter: SupervisionConfig = field(default_factory=SupervisionConfig)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def service_name(self) -> str:
        """The babysitter's registry name (upstream default: `{type}-{port}`)."""
        return self.name or f"{self.backend.type.lower().replace(' ', '-')}-{self.port}"

    @property
    def server_name(self) -> str:
        """The backend's registry name."""
        return f"{self.service_name}-server"

    @property
    def api_port(self) -> int:
        return self.port + 1

    def check(self) -> list[tuple[str, str]]:
        out = []
        if (m := check_port(self.port)):
            out.append(("port", m))
        elif self.port == 65535:
            out.append(("port", "port must leave room for the babysitter on port + 1"))
        if self.name is not None and (not self.name.strip() or "/" in self.name):
            out.append(("name", f"name must be non-empty and contain no '/', got {self.name!r}"))
        if (m := check_urls(self.registry_url)):
            out.append(("registry_url", m))
        if (m := check_url(self.router_url)):
            out.append(("router_url", m))
        if self.token is not None and not self.token.strip():
            # An empty token would silently leave POST /restart|/stop|/start open.
            out.append(("token", "token must not be empty (leave it out to disable auth)"))
        return out

    def with_paths_from(self, directory: str) -> "BabysitterConfig":
        """This config with its paths resolved once, as the file meant them: ~ and $VARIABLES
        expanded, relative ones taken from `directory` (the file's), `log_file` placed in `log_dir`."""
        b, policy = self.backend, self.babysitter
        log_dir = _absolute(policy.log_dir, directory)
        return replace(
            self,
            backend=replace(b, work_dir=_absolute(b.work_dir, directory), model_path=_absolute(b.model_path, directory)),
            babysitter=replace(policy, log_dir=log_dir, log_file=_absolute(policy.log_file, log_dir)))

    def check_files(self) -> list[tuple[str, str]]:
        """Files the backend needs that are missing now (check-config; at run time the engine says)."""
        b = self.backend
        out = []
        if b.type == "llama.cpp" and b.model_path:
            if (m := gguf_problem(b.model_path)):
                out.append(("backend.model_path", m))
        return out

    def with_overrides(self, **overrides: Any) -> "BabysitterConfig":
        """Apply the upstream CLI overrides (--name --port --host --registry-url --router-url)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})
