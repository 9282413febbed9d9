#!/usr/bin/env bash
# start-server1.sh [SERVER1_IP]: run server 1 (registry :18000, router :8000, babysitters A and B)
# from the built pyz, in the background, and wait until every part of it is ready.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

S1=${1:-${SERVER1_IP:-127.0.0.2}}
check_ip "$S1"
BIND=${BIND:-$S1}        # listen address; BIND=0.0.0.0 listens on every interface
need_pyz
use_engine

start_server server1 --config "$CONFIG_DIR/server1.toml" \
    --bind "$BIND" --host "$S1" --registry-url "http://$S1:$REGISTRY_PORT"
wait_ready server1 "http://$S1:$REGISTRY_PORT/health" "http://$S1:$ROUTER_PORT/health" \
    "http://$S1:8101/health" "http://$S1:8201/health"
echo "server 1 on $S1: registry http://$S1:$REGISTRY_PORT, router http://$S1:$ROUTER_PORT (log $RUN_DIR/server1.log)"
