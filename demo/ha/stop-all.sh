#!/usr/bin/env bash
# stop-all.sh [server1 server2 server3 etcd1 etcd2 etcd3 ...]: stop what the HA demo started (from
# RUN_DIR's pid files): the servers first (their babysitters deregister while etcd still runs),
# then the etcd members. TERM, KILL after STOP_TIMEOUT, and check that nothing is left.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(server3 server2 server1 etcd3 etcd2 etcd1)
found=0
for name in "${names[@]}"; do
    [ -f "$RUN_DIR/$name.pid" ] || continue
    found=1
    stop_server "$name"
done
[ $found = 1 ] || echo "nothing to stop (no pid files in $RUN_DIR)"
