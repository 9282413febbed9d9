#!/usr/bin/env bash
# stop-all.sh [server1|server2 ...]: stop the servers the start scripts started (from RUN_DIR's pid
# files, whatever addresses they use): TERM, KILL after STOP_TIMEOUT, and check that nothing is left.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    # Server 2 first, so its babysitters can still deregister from server 1's registry.
    names=(server2 server1)
fi
found=0
for name in "${names[@]}"; do
    [ -f "$RUN_DIR/$name.pid" ] || continue
    found=1
    stop_server "$name"
done
[ $found = 1 ] || echo "nothing to stop (no pid files in $RUN_DIR)"
