#!/usr/bin/env bash
# validate.sh [SERVER1_IP] [validate options...]: run `infinilm-svc validate` against the demo.
# Waits up to VALIDATE_WAIT seconds (default 20) for all 8 records to be healthy, then runs the checks.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

S1=${SERVER1_IP:-127.0.0.2}
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then S1=$1; shift; fi
check_ip "$S1"
need_pyz
exec "${PYZ_CMD[@]}" validate --registry "http://$S1:$REGISTRY_PORT" --wait "${VALIDATE_WAIT:-20}" "$@"
