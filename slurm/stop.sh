#!/usr/bin/env bash
# Stop the development SLURM cluster started by slurm/start.sh: TERM each daemon by the pid in
# its pid file (never by name), wait, then KILL that pid if it is still there; then remove
# what the two-node mode created: what still runs in the node namespaces (by pid), the
# namespaces, veth pairs, the bridge and the /etc/hosts block.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_TAG=stop
# shellcheck source=common.sh
source "$HERE/common.sh"
export PATH="$PATH:/usr/sbin:/sbin"

rm -f "$STARTED_HASH" "$MODE_FILE"
stop_slurmds
for d in slurmctld slurmdbd; do
    if pid_alive "$RUN_DIR/$d.pid" "$d"; then
        stop_by_pidfile "$RUN_DIR/$d.pid" "$d"
        step "stopped $d"
    fi
done
if pid_alive "$MYSQL_PID" mariadbd; then
    stop_by_pidfile "$MYSQL_PID" mariadbd
    step "stopped mariadbd"
fi
if pid_alive "$MUNGE_PID" munged; then
    stop_by_pidfile "$MUNGE_PID" munged
    step "stopped munged"
fi
teardown_nodes
step "stopped"
