#!/usr/bin/env bash
# ./build.sh        -> builds ./infinilm-svc.pyz (a shiv zipapp holding every role)
# ./build.sh test   -> installs the test dependencies, builds the pyz, runs the whole test suite
# ./build.sh bench  -> builds the pyz and runs the benchmarks in bench/
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

case "${1:-build}" in
    build)
        ensure_venv; install_deps ""; build_pyz ;;
    test)
        shift || true
        ensure_venv; install_deps "[test]"; build_pyz
        # The whole suite runs on uvloop (what every role uses where it can) and on asyncio's own loop.
        status=0
        for loop in ${INFINILM_TEST_LOOPS:-uvloop asyncio}; do
            echo "build.sh: running tests on the $loop event loop"
            INFINILM_LOOP=$loop "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" || status=$?
        done
        exit $status ;;
    bench)
        shift || true
        ensure_venv; install_deps "[test]"; build_pyz
        for b in bench/*.py; do echo "== $b"; "$VENV/bin/python" "$b" "$@"; done ;;
    *)
        echo "usage: ./build.sh [build|test [pytest args]|bench]" >&2; exit 2 ;;
esac
