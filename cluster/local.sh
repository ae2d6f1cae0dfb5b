#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: a head and worker raylets as separate processes.
#   cluster/local.sh start [--workers 2] [--cpus-per-node 1] [--dashboard-port 8265]
#   cluster/local.sh status [--json]
#   cluster/local.sh stop
# The same as `stkd cluster local ...` (one implementation: stkd_dist/ops/local_cluster.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -x "$here/../.venv/bin/stkd" ]]; then
    stkd="$here/../.venv/bin/stkd"
elif command -v stkd >/dev/null 2>&1; then
    stkd="$(command -v stkd)"
else
    echo "local.sh: stkd is not installed (run \`make install\` in the repository)" >&2
    exit 2
fi

case "${1:-}" in
    start | stop | status) ;;
    *)
        echo "usage: cluster/local.sh start|stop|status [options]   (see: stkd cluster local --help)" >&2
        exit 2
        ;;
esac
exec "$stkd" cluster local "$@"
