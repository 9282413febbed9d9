#!/usr/bin/env bash
# start-server.sh N S1 S2 S3: run "server" N of three (N = 1, 2 or 3; S1..S3 their IPv4 addresses):
# etcd member mN, then the pyz with the registry (store = etcd), the router and server N's
# babysitters. Waits until each part is ready. The three etcd members must be started before any
# registry can start (etcd needs a quorum): run-local.sh does that.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ $# -eq 4 ] || die "usage: start-server.sh N S1 S2 S3"
N=$1; shift
[[ "$N" =~ ^[123]$ ]] || die "N must be 1, 2 or 3, got '$N'"
for ip in "$@"; do check_ip "$ip"; done
IPS=("$@")
ME=${IPS[$((N - 1))]}
need_pyz
local_config "$@"

start_server "server$N" --config "$CONFIG_DIR/server$N.toml" --bind "$ME" --host "$ME" \
    --registry-url "$(registry_list "$N" "$@")"
urls=("http://$ME:$REGISTRY_PORT/health" "http://$ME:$ROUTER_PORT/health")
case $N in
    1) urls+=("http://$ME:8101/health") ;;
    2) urls+=("http://$ME:8101/health" "http://$ME:8201/health") ;;
    3) urls+=("http://$ME:8201/health") ;;
esac
wait_ready "server$N" "${urls[@]}"
echo "server $N on $ME: etcd http://$ME:$ETCD_CLIENT_PORT, registry http://$ME:$REGISTRY_PORT, router http://$ME:$ROUTER_PORT"
