#!/usr/bin/env bash
# Stop the development SLURM cluster started by slurm/start.sh: TERM each daemon by the pid in
# its pid file (never by name), wait, then KILL that pid if it is still there.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_TAG=stop
# shellcheck source=common.sh
source "$HERE/common.sh"

rm -f "$STARTED_HASH"
for d in slurmd slurmctld slurmdbd; do
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
step "stopped"
