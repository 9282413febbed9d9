#!/usr/bin/env bash
# run-local.sh [--engine mock|llama.cpp] [SERVER1_IP SERVER2_IP]: play both servers on this machine on
# two loopback addresses (default 127.0.0.2 and 127.0.0.3), validate, and leave them running.
# --engine llama.cpp (or ENGINE=llama.cpp) runs llama.cpp's llama-server with two tiny llama models as
# model-1 and model-2 instead of the mock; build them first with ./build.sh engine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [ "${1:-}" = "--engine" ]; then
    [ $# -ge 2 ] || die "--engine needs a value: mock or llama.cpp"
    ENGINE=$2; shift 2
elif [[ "${1:-}" == --engine=* ]]; then
    ENGINE=${1#--engine=}; shift
fi
export ENGINE
use_engine

S1=${1:-${SERVER1_IP:-127.0.0.2}}
S2=${2:-${SERVER2_IP:-127.0.0.3}}
for ip in "$S1" "$S2"; do
    check_ip "$ip"
    [[ "$ip" == 127.* ]] || die "$ip is not a loopback address (127.0.0.0/8); for two machines use start-server1.sh and start-server2.sh"
done
[ "$S1" != "$S2" ] || die "the two servers need two different addresses (both use ports 8100/8101 and 8200/8201)"
need_pyz

export RUN_DIR
"$DEMO_DIR/start-server1.sh" "$S1"
"$DEMO_DIR/start-server2.sh" "$S1" "$S2"
echo
rc=0
"$DEMO_DIR/validate.sh" "$S1" || rc=$?
stop_cmd="$DEMO_DIR/stop-all.sh"
[ "$PWD" = "$REPO_ROOT" ] && stop_cmd=demo/integration-validation/stop-all.sh
[ "$RUN_DIR" = "$DEMO_DIR/run" ] || stop_cmd="RUN_DIR=$RUN_DIR $stop_cmd"
echo
echo "The demo is still running (pids and logs in $RUN_DIR)."
pyz_shown="${PYZ_CMD[*]}"
[ -z "${INFINILM_PYTHON:-}" ] && [ "$PYZ" = "$REPO_ROOT/infinilm-svc.pyz" ] && [ "$PWD" = "$REPO_ROOT" ] && pyz_shown=./infinilm-svc.pyz
echo "Open the console:  $pyz_shown console --registry http://$S1:$REGISTRY_PORT"
echo "Stop everything:   $stop_cmd"
exit $rc
