#!/usr/bin/env bash
# validate.sh [IP] [validate options...]: run `infinilm-svc validate` through the registry on IP
# (default 127.0.0.22, server 2): any one of the three registries sees the whole deployment.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

IP=127.0.0.22
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then IP=$1; shift; fi
check_ip "$IP"
need_pyz
exec "${PYZ_CMD[@]}" validate --registry "http://$IP:$REGISTRY_PORT" --wait "${VALIDATE_WAIT:-30}" "$@"
