# Shared paths and helpers for slurm/start.sh and slurm/stop.sh (sourced, not run).

CLUSTER_NAME=magseg
SLURM_ETC=/etc/slurm
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
GPU_DIR=/var/lib/magseg-slurm
NUM_GPUS=2
NODE_CPUS=8
MYSQL_SOCKET=/run/mysqld/mysqld.sock
MYSQL_PID=/run/mysqld/mysqld.pid
MYSQL_LOG=/var/log/mysql/error.log
MUNGE_PID=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
# Hash of the configuration the running SLURM daemons were started with.
STARTED_HASH="$RUN_DIR/magseg-config.sha256"

_t0=${EPOCHREALTIME/./}
step() {
    local us=$(( ${EPOCHREALTIME/./} - _t0 ))
    printf '[%s %3d.%01ds] %s\n' "$SCRIPT_TAG" $((us / 1000000)) $((us % 1000000 / 100000)) "$*"
}

# proc_is PID COMM: PID is a live (not zombie) process running COMM; guards against reused pids.
proc_is() {
    local pid=$1 comm=$2 stat
    [ -n "$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# pid_of PIDFILE: the pid written in PIDFILE, empty when there is none.
pid_of() {
    tr -dc '0-9' 2>/dev/null <"$1" || true
}

# pid_alive PIDFILE COMM: the pid in PIDFILE runs COMM.
pid_alive() {
    proc_is "$(pid_of "$1")" "$2"
}

# stop_by_pidfile PIDFILE COMM: TERM, wait up to 10 s, then KILL that pid only.
stop_by_pidfile() {
    local pidfile=$1 comm=$2 pid i
    pid=$(pid_of "$pidfile")
    if ! proc_is "$pid" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        proc_is "$pid" "$comm" || break
        sleep 0.1
    done
    if proc_is "$pid" "$comm"; then
        step "$comm (pid $pid) ignored TERM for 10 s: KILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
