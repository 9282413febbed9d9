#!/usr/bin/env bash
# run-local.sh [S1 S2 S3]: play three servers on this machine on three loopback addresses (default
# 127.0.0.21-23, the addresses config/ names; others are written into RUN_DIR/config): an etcd member, a registry and a router on each, babysitters with mock backends
# spread over them. Then validate through one registry (VALIDATE_VIA = 1, 2 or 3; default 2) and
# leave everything running.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

S1=${1:-127.0.0.21}; S2=${2:-127.0.0.22}; S3=${3:-127.0.0.23}
IPS=("$S1" "$S2" "$S3")
for ip in "${IPS[@]}"; do
    check_ip "$ip"
    [[ "$ip" == 127.* ]] || die "$ip is not a loopback address (127.0.0.0/8); on real machines use start-server.sh"
done
[ "$(printf '%s\n' "${IPS[@]}" | sort -u | wc -l)" = 3 ] || die "the three servers need three different addresses"
need_pyz
find_etcd

mkdir -p "$RUN_DIR"
if ! running etcd1 && ! running etcd2 && ! running etcd3; then
    rm -rf "$RUN_DIR"/etcd?.data           # a new cluster: no members left from an earlier run
fi
cluster=$(initial_cluster "${IPS[@]}")
for n in 1 2 3; do start_etcd "$n" "${IPS[$((n - 1))]}" "$cluster"; done
deadline=$((SECONDS + READY_TIMEOUT))
for n in 1 2 3; do
    until curl -fsS --max-time 2 "http://${IPS[$((n - 1))]}:$ETCD_CLIENT_PORT/health" 2>/dev/null | grep -q '"health":"true"'; do
        running "etcd$n" || { tail -n 20 "$RUN_DIR/etcd$n.log" >&2; die "etcd$n exited"; }
        [ $SECONDS -lt $deadline ] || die "etcd$n not healthy after ${READY_TIMEOUT}s (log $RUN_DIR/etcd$n.log)"
        sleep 0.2
    done
done
echo "etcd: three members healthy"
for n in 1 2 3; do "$HA_DIR/start-server.sh" "$n" "${IPS[@]}"; done
echo
VIA=${VALIDATE_VIA:-2}
rc=0
"$HA_DIR/validate.sh" "${IPS[$((VIA - 1))]}" || rc=$?
echo
echo "The HA demo is still running (pids and logs in $RUN_DIR)."
echo "Registries: http://$S1:$REGISTRY_PORT http://$S2:$REGISTRY_PORT http://$S3:$REGISTRY_PORT (any one will do)"
echo "Console:  ${PYZ_CMD[*]} console --registry http://$S1:$REGISTRY_PORT,http://$S2:$REGISTRY_PORT,http://$S3:$REGISTRY_PORT"
echo "Stop everything:  $HA_DIR/stop-all.sh"
exit $rc
