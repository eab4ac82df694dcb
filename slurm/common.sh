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

# --- the two-node mode: each slurmd "node" in its own network and UTS namespace -----------
# A bridge in the root namespace holds BRIDGE_ADDR; node i (n1, n2, ...) lives in the network
# namespace magseg-n<i> behind a veth pair (msv-n<i> on the bridge, eth0 inside) with the
# address ${SUBNET}.$((10 + i)). Nothing is routed off the machine (ip_forward is untouched).
SUBNET=${MAGSEG_SLURM_SUBNET:-10.213.7}
BRIDGE=msbr0
BRIDGE_ADDR=$SUBNET.1
NODE_NAMES=(n1 n2)
NS_PREFIX=magseg-
VETH_PREFIX=msv-
HOSTS_BEGIN="# magseg-slurm begin (slurm/start.sh; removed by slurm/stop.sh)"
HOSTS_END="# magseg-slurm end"
# Which mode the running cluster was started in (multi or single).
MODE_FILE="$RUN_DIR/magseg-mode"

node_addr() {  # node_addr INDEX (1-based)
    echo "$SUBNET.$((10 + $1))"
}

# hosts_block_remove: drop the lines between the markers from /etc/hosts, in place (the file
# may be a bind mount, so it is rewritten, never replaced).
hosts_block_remove() {
    grep -qF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null || return 0
    local kept
    kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" \
        '$0 == b {skip = 1; next} $0 == e {skip = 0; next} !skip' /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

# hosts_block_write LINE...: replace the marked block with these lines (unchanged: no write).
hosts_block_write() {
    local want current
    want=$(printf '%s\n' "$HOSTS_BEGIN" "$@" "$HOSTS_END")
    current=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" \
        '$0 == b {on = 1} on {print} $0 == e {on = 0}' /etc/hosts 2>/dev/null || true)
    [ "$current" = "$want" ] && return 1
    hosts_block_remove
    # The file may lack a final newline ("127.0.0.1 vm" then our first line would merge).
    if [ -s /etc/hosts ] && [ "$(tail -c1 /etc/hosts | od -An -c | tr -d ' ')" != '\n' ]; then
        echo >>/etc/hosts
    fi
    printf '%s\n' "$want" >>/etc/hosts
}

# stop_slurmds: every slurmd this project started, by the pid files it wrote.
stop_slurmds() {
    local f
    for f in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR/slurmd.pid"; do
        [ -e "$f" ] || continue
        if pid_alive "$f" slurmd; then
            stop_by_pidfile "$f" slurmd
            step "stopped slurmd ($(basename "$f" .pid))"
        fi
        rm -f "$f"
    done
}

# kill_in_netns NS: TERM, then KILL, whatever still runs in that namespace (job steps left by
# a killed slurmd), by pid.
kill_in_netns() {
    local ns=$1 pids i
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    step "terminating processes left in $ns: $(echo $pids)"
    kill -TERM $pids 2>/dev/null || true
    for i in $(seq 50); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] || return 0
        sleep 0.1
    done
    kill -KILL $pids 2>/dev/null || true
}

# teardown_nodes: namespaces, veths, bridge and hosts block of the two-node mode.
teardown_nodes() {
    local ns link removed=""
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
        kill_in_netns "$ns"
        ip netns delete "$ns" 2>/dev/null || true
        removed="$removed $ns"
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
            | grep "^$VETH_PREFIX" || true); do
        ip link delete "$link" 2>/dev/null || true
        removed="$removed $link"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link delete "$BRIDGE" type bridge 2>/dev/null || true
        removed="$removed $BRIDGE"
    fi
    if grep -qF "$HOSTS_BEGIN" /etc/hosts 2>/dev/null; then
        hosts_block_remove
        removed="$removed /etc/hosts-entries"
    fi
    [ -z "$removed" ] || step "removed$removed"
}
