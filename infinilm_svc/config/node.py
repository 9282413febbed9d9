"""Loading config files: node files (`[registry]`, `[router]`, `babysitters`) and babysitter files."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from .babysitter import BabysitterConfig
from .registry import RegistryConfig
from .router import RouterConfig
from .schema import ConfigError, Problem, Source, is_missing, load_table


@dataclass(frozen=True)
class NodeConfig:
    """Every role one process hosts, merged from all the --config files."""

    registry: RegistryConfig | None = None
    router: RouterConfig | None = None
    babysitters: tuple[BabysitterConfig, ...] = ()

    @property
    def empty(self) -> bool:
        return self.registry is None and self.router is None and not self.babysitters


def _is_babysitter_file(data: dict) -> bool:
    return not any(k in data for k in ("registry", "router", "babysitters")) and (
        "backend" in data or "port" in data
    )


def _load_babysitter(path: Path, src: Source, data: dict, check_files: bool) -> BabysitterConfig | None:
    cfg = load_table(BabysitterConfig, data, src)
    if is_missing(cfg):
        return None
    cfg = cfg.with_paths_from(str(path.parent.resolve()))
    if check_files:
        for key, msg in cfg.check_files():
            src.problem(tuple(key.split(".")), msg)
    return cfg


def _load_one(path: Path, problems: list[Problem], seen: set[Path], check_files: bool) -> tuple[NodeConfig, list[str]]:
    """The roles of one file, and the file each of its babysitters came from."""
    real = path.resolve()
    if real in seen:
        problems.append(Problem(str(path), None, "", "file is included more than once"))
        return NodeConfig(), []
    seen.add(real)
    src, data = Source.read(path, problems)
    if data is None:
        return NodeConfig(), []
    if _is_babysitter_file(data):
        b = _load_babysitter(path, src, data, check_files)
        return (NodeConfig(babysitters=(b,)), [str(path)]) if b else (NodeConfig(), [])
    if not any(k in data for k in ("registry", "router", "babysitters")):
        src.problem((), "declares no role: expected [registry], [router], babysitters = [...] "
                        "or an upstream babysitter file (port, [backend])")
        return NodeConfig(), []
    for key in data:
        if key not in ("registry", "router", "babysitters"):
            src.problem((key,), "unknown key (known keys here: babysitters, registry, router)")
    registry = router = None
    first = len(problems)
    if "registry" in data:
        r = load_table(RegistryConfig, data["registry"], src, ("registry",)) if isinstance(data["registry"], dict) else None
        if r is None:
            src.problem(("registry",), "expected a table")
        registry = None if r is None or is_missing(r) else r
    if "router" in data:
        r = load_table(RouterConfig, data["router"], src, ("router",)) if isinstance(data["router"], dict) else None
        if r is None:
            src.problem(("router",), "expected a table")
        router = None if r is None or is_missing(r) else r
        if router is not None and router.static_services and not os.path.isabs(router.static_services):
            router = replace(router, static_services=str((path.parent / router.static_services).resolve()))
    for i in range(first, len(problems)):
        # `babysitters = [...]` written after a table belongs to that table in TOML.
        if problems[i].key in ("registry.babysitters", "router.babysitters"):
            table = problems[i].key.split(".")[0]
            problems[i] = replace(problems[i], message=f"babysitters = [...] must come before the first table: "
                                                       f"written after [{table}], TOML reads it as a key of [{table}]")
    babysitters: list[BabysitterConfig] = []
    files: list[str] = []
    if "babysitters" in data:
        entries = data["babysitters"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            src.problem(("babysitters",), "expected an array of file names (relative to this file)")
        else:
            for entry in entries:
                child = (path.parent / entry)
                if not child.is_file():
                    # Reported at the node file's line that names it: that is where the mistake is.
                    src.problem(("babysitters",), f"{entry!r}: no such babysitter file ({child})")
                    continue
                sub_src, sub = Source.read(child, problems)
                if sub is None:
                    continue
                if not _is_babysitter_file(sub):
                    sub_src.problem((), "listed in babysitters but is not a babysitter file (needs port and [backend])")
                    continue
                if child.resolve() in seen:
                    problems.append(Problem(str(child), None, "", "file is included more than once"))
                    continue
                seen.add(child.resolve())
                b = _load_babysitter(child, sub_src, sub, check_files)
                if b:
                    babysitters.append(b)
                    files.append(str(child))
    return NodeConfig(registry=registry, router=router, babysitters=tuple(babysitters)), files


def in_file_order(problems: list[Problem]) -> list[Problem]:
    """Problems by file (in the order the files were read) and then by line, as a reader goes through them."""
    rank = {f: i for i, f in enumerate(dict.fromkeys(p.file for p in problems))}
    return sorted(problems, key=lambda p: (rank[p.file], p.line or 0))


def load_config_files(paths: Iterable[str | os.PathLike[str]], check_files: bool = False) -> NodeConfig:
    """Load and merge config files; raise ConfigError listing every problem in every file.

    check_files (check-config) also checks that files a backend needs (a GGUF model) exist now; a
    running babysitter leaves that to the engine, whose own error it reports.
    """
    problems: list[Problem] = []
    seen: set[Path] = set()
    registry = router = None
    babysitters: list[BabysitterConfig] = []
    files: list[str] = []   # the file of each babysitter
    for p in paths:
        node, node_files = _load_one(Path(p), problems, seen, check_files)
        if node.registry is not None:
            if registry is not None:
                problems.append(Problem(str(p), None, "registry", "a second [registry]: one process hosts at most one"))
            registry = node.registry
        if node.router is not None:
            if router is not None:
                problems.append(Problem(str(p), None, "router", "a second [router]: one process hosts at most one"))
            router = node.router
        babysitters.extend(node.babysitters)
        files.extend(node_files)
    _check_collisions(registry, router, babysitters, files, problems)
    if problems:
        raise ConfigError(in_file_order(problems))
    return NodeConfig(registry=registry, router=router, babysitters=tuple(babysitters))


def _check_collisions(registry: RegistryConfig | None, router: RouterConfig | None,
                      babysitters: list[BabysitterConfig], files: list[str], problems: list[Problem]) -> None:
    """Two roles of one process on one address and port, or two babysitters with one name."""
    taken: list[tuple[str, int, str]] = []

    def claim(bind: str, port: int, what: str, where: str) -> None:
        for b, p, other in taken:
            if p == port and (b == bind or "0.0.0.0" in (b, bind)):
                problems.append(Problem(where, None, "port", f"port {port} ({what}) is also used by {other}"))
                return
        taken.append((bind, port, what))

    if registry is not None:
        claim(registry.bind, registry.port, "the registry", "[registry]")
    if router is not None:
        claim(router.bind, router.port, "the router", "[router]")
    names: set[str] = set()
    for b, file in zip(babysitters, files, strict=True):
        if b.service_name in names:
            problems.append(Problem(file, None, "name", f"two babysitters are named {b.service_name!r}"))
        names.add(b.service_name)
        claim(b.bind, b.port, f"backend of {b.service_name}", b.service_name)
        claim(b.bind, b.api_port, f"babysitter {b.service_name}", b.service_name)


def apply_overrides(node: NodeConfig, *, bind: str | None = None, host: str | None = None,
                    registry_url: str | None = None, router_url: str | None = None,
                    name: str | None = None, port: int | None = None) -> NodeConfig:
    """Apply command-line overrides: the upstream babysitter ones, plus --bind for every role."""
    if (name is not None or port is not None) and len(node.babysitters) != 1:
        raise ConfigError([Problem("command line", None, "--name/--port",
                                   f"--name and --port apply to exactly one babysitter; these configs declare {len(node.babysitters)}")])
    registry, router = node.registry, node.router
    if bind is not None:
        if registry is not None:
            registry = replace(registry, bind=bind)
            # The same refusal as in the file: --bind must not open an unauthenticated registry.
            for key, message in registry.check():
                if key == "bind":
                    raise ConfigError([Problem("command line", None, "--bind", message)])
        if router is not None:
            router = replace(router, bind=bind)
    if router is not None and registry_url is not None:
        router = replace(router, registry_url=registry_url)
    babysitters = tuple(
        b.with_overrides(bind=bind, host=host, registry_url=registry_url, router_url=router_url,
                         name=name, port=port)
        for b in node.babysitters
    )
    return replace(node, registry=registry, router=router, babysitters=babysitters)
