#!/usr/bin/env bash
# start-server2.sh SERVER1_IP SERVER2_IP: run server 2 (babysitters C and D) from the built pyz, in the
# background, registering with server 1's registry; wait until both backends are ready.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

S1=${1:-${SERVER1_IP:-}}
S2=${2:-${SERVER2_IP:-}}
if [ -z "$S1" ] || [ -z "$S2" ]; then die "usage: $0 SERVER1_IP SERVER2_IP"; fi
check_ip "$S1"; check_ip "$S2"
BIND=${BIND:-$S2}
need_pyz
use_engine

# Like upstream: no point starting without server 1's registry.
deadline=$((SECONDS + ${REGISTRY_WAIT:-10}))
until http_ok "http://$S1:$REGISTRY_PORT/health"; do
    [ $SECONDS -ge $deadline ] && die "server 1's registry at http://$S1:$REGISTRY_PORT is not reachable; start server 1 first"
    sleep 0.2
done

start_server server2 --config "$CONFIG_DIR/server2.toml" \
    --bind "$BIND" --host "$S2" --registry-url "http://$S1:$REGISTRY_PORT"
wait_ready server2 "http://$S2:8101/health" "http://$S2:8201/health"
echo "server 2 on $S2: babysitters C (:8101) and D (:8201), registered with http://$S1:$REGISTRY_PORT (log $RUN_DIR/server2.log)"
