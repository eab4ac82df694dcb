#!/usr/bin/env bash
# Start the development SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld and
# the slurmd "nodes"), each node with two fake GPUs, for development and CI. Needs root and
# slurm/install.sh first. No systemd: daemons are started directly and stopped by
# slurm/stop.sh through pid files.
#
#   bash slurm/start.sh                 two nodes, n1 and n2, each slurmd in its own network
#                                       and UTS namespace on a bridge this script creates
#   bash slurm/start.sh --single-node   one node: this host on 127.0.0.1 (for a machine
#                                       without network-namespace rights); also
#                                       MAGSEG_SLURM_NODES=1
#
# Idempotent: daemons running with an unchanged configuration are left alone.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_TAG=start
# shellcheck source=common.sh
source "$HERE/common.sh"

dump_logs() {
    local rc=$?
    [ "$rc" -eq 0 ] && return 0
    echo "slurm/start.sh failed (exit $rc); log tails follow" >&2
    for f in "$MUNGE_LOG" "$MYSQL_LOG" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log" \
        "$LOG_DIR"/slurmd-*.log "$LOG_DIR"/slurmd-*.out; do
        if [ -r "$f" ]; then
            echo "----- tail -n 25 $f" >&2
            tail -n 25 "$f" >&2
        fi
    done
    sinfo -N -l >&2 2>/dev/null || true
}
trap dump_logs EXIT

fail() { echo "slurm/start.sh: $*" >&2; exit 1; }

MODE=multi
[ "${MAGSEG_SLURM_NODES:-2}" = 1 ] && MODE=single
for arg in "$@"; do
    case "$arg" in
        --single-node) MODE=single ;;
        --two-nodes) MODE=multi ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) fail "unknown argument $arg (valid: --single-node, --two-nodes)" ;;
    esac
done

# wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local seconds=$1 what=$2 i
    shift 2
    for i in $(seq $((seconds * 5))); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    fail "timed out after ${seconds}s waiting for $what"
}

[ "$(id -u)" -eq 0 ] || fail "run as root (the daemons run as root, munged as munge)"
for cmd in munged mungekey mariadbd slurmdbd slurmctld slurmd sinfo sacctmgr scontrol; do
    command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] \
        || fail "$cmd not found: run 'bash slurm/install.sh' first"
done
export PATH="$PATH:/usr/sbin:/sbin"

# --- host name: slurm, srun and torch.distributed (MASTER_ADDR) must resolve it
HOST=$(hostname -s)
hosts_lines=()
# Resolvable outside our own /etc/hosts block (which is rewritten below)?
if ! awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" -v h="$HOST" '
        $0 == b {skip = 1; next} $0 == e {skip = 0; next}
        !skip && !/^[[:space:]]*#/ {for (i = 2; i <= NF; i++) if ($i == h) found = 1}
        END {exit !found}' /etc/hosts && ! getent hosts "$HOST" >/dev/null; then
    hosts_lines+=("127.0.0.1 $HOST")
fi

# --- the nodes: one network + UTS namespace per slurmd (two-node mode)
if [ "$MODE" = multi ]; then
    CTLD_ADDR=$BRIDGE_ADDR
    NODES="n[1-${#NODE_NAMES[@]}]"
    addrs=()
    for i in "${!NODE_NAMES[@]}"; do
        addrs+=("$(node_addr $((i + 1)))")
        hosts_lines+=("$(node_addr $((i + 1))) ${NODE_NAMES[$i]}")
    done
    NODE_ADDRS=$(IFS=,; echo "${addrs[*]}")
    # A namespace we cannot create is a reason to stop, printed, never a silent fallback.
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        if ! why=$(ip link add "$BRIDGE" type bridge 2>&1); then
            fail "cannot create the bridge $BRIDGE for the two-node cluster: $why
(no network-namespace rights here?) start the one-node cluster instead: bash slurm/start.sh --single-node"
        fi
        step "created bridge $BRIDGE"
    fi
    ip addr replace "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    root_addrs=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 \
        | grep -vx "$BRIDGE_ADDR" || true)
    for i in "${!NODE_NAMES[@]}"; do
        node=${NODE_NAMES[$i]} ns=$NS_PREFIX${NODE_NAMES[$i]} veth=$VETH_PREFIX${NODE_NAMES[$i]}
        addr=$(node_addr $((i + 1)))
        if [ ! -e "/run/netns/$ns" ]; then
            if ! why=$(ip netns add "$ns" 2>&1); then
                fail "cannot create network namespace $ns: $why
start the one-node cluster instead: bash slurm/start.sh --single-node"
            fi
        fi
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip -n "$ns" link delete eth0 2>/dev/null || true
            ip link add "$veth" type veth peer name "${veth}p"
            ip link set "${veth}p" netns "$ns"
            ip -n "$ns" link set "${veth}p" name eth0
            step "created $ns ($node, $addr) with veth $veth on $BRIDGE"
        fi
        ip link set "$veth" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        # No default route: what is not on this machine is unreachable at once. (With one,
        # DNS queries for names not in /etc/hosts, e.g. the reverse lookups of v4-mapped
        # addresses that torch.distributed makes, wait 10 s each for a server that cannot
        # be reached.) Only this machine's own addresses are routed, through the bridge:
        # e.g. a Dask scheduler started in the root namespace listens on one of them.
        ip -n "$ns" route del default 2>/dev/null || true
        for host_addr in $root_addrs; do
            ip -n "$ns" route replace "$host_addr/32" via "$BRIDGE_ADDR"
        done
    done
else
    CTLD_ADDR=127.0.0.1
    NODES=$HOST
    NODE_ADDRS=127.0.0.1
    teardown_nodes   # left by an earlier two-node start
fi
if [ ${#hosts_lines[@]} -gt 0 ]; then
    hosts_block_write "${hosts_lines[@]}" && step "/etc/hosts: ${hosts_lines[*]}"
else
    hosts_block_remove
fi

# --- directories and fake GPUs (slurmd insists on character devices: link to /dev/null)
mkdir -p "$SLURM_ETC" "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd "$GPU_DIR"
last_gpu=$((NUM_GPUS - 1))
for i in $(seq 0 "$last_gpu"); do
    [ -L "$GPU_DIR/gpu$i" ] || ln -sfn /dev/null "$GPU_DIR/gpu$i"
done

# --- configuration from the templates, with this machine's name and memory
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
memory_mb=$((mem_kb * 9 / 10 / 1024))
render() {
    sed -e "s/@HOST@/$HOST/g" -e "s/@CTLD_ADDR@/$CTLD_ADDR/g" -e "s/@NODES@/$NODES/g" \
        -e "s/@NODE_ADDRS@/$NODE_ADDRS/g" -e "s/@CPUS@/$NODE_CPUS/g" -e "s/@MEMORY_MB@/$memory_mb/g" \
        -e "s/@CLUSTER@/$CLUSTER_NAME/g" -e "s/@GPUS@/$NUM_GPUS/g" \
        -e "s|@GPU_DIR@|$GPU_DIR|g" -e "s/@LAST_GPU@/$last_gpu/g" "$HERE/$1.in"
}
for name in slurm.conf gres.conf slurmdbd.conf; do
    rendered=$(render "$name")
    if [ ! -f "$SLURM_ETC/$name" ] || [ "$rendered" != "$(cat "$SLURM_ETC/$name")" ]; then
        printf '%s\n' "$rendered" >"$SLURM_ETC/$name"
        step "wrote $SLURM_ETC/$name"
    fi
done
chmod 644 "$SLURM_ETC/slurm.conf" "$SLURM_ETC/gres.conf"
chmod 600 "$SLURM_ETC/slurmdbd.conf"   # slurmdbd refuses a readable config
config_hash=$(cat "$SLURM_ETC"/slurm.conf "$SLURM_ETC"/gres.conf "$SLURM_ETC"/slurmdbd.conf \
    | sha256sum | cut -d' ' -f1)
restart_slurm=0
if [ "$(cat "$STARTED_HASH" 2>/dev/null || true)" != "$config_hash" ]; then
    restart_slurm=1
fi

# --- munge (as the munge user: as root munged refuses, "Logfile is insecure")
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create
    step "created /etc/munge/munge.key"
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if pid_alive "$MUNGE_PID" munged; then
    step "munged already running"
else
    runuser -u munge -- munged
    step "started munged"
fi
wait_for 10 "munge to answer" bash -c 'munge -n | unmunge'

# --- MariaDB for slurmdbd, on its socket only
mkdir -p /run/mysqld /var/log/mysql
chown mysql:mysql /run/mysqld /var/log/mysql
if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
        --auth-root-authentication-method=socket >/dev/null
    step "initialised /var/lib/mysql"
fi
if pid_alive "$MYSQL_PID" mariadbd; then
    step "mariadbd already running"
else
    setsid -f mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCKET" \
        --pid-file="$MYSQL_PID" --log-error="$MYSQL_LOG" </dev/null >/dev/null 2>&1
    step "started mariadbd"
fi
wait_for 30 "MariaDB on $MYSQL_SOCKET" mariadb-admin --socket="$MYSQL_SOCKET" ping

# --- SLURM daemons: restart them only when the configuration changed
if [ "$restart_slurm" -eq 1 ]; then
    stop_slurmds
    stopped=""
    for d in slurmctld slurmdbd; do
        if pid_alive "$RUN_DIR/$d.pid" "$d"; then
            stop_by_pidfile "$RUN_DIR/$d.pid" "$d"
            stopped="$stopped $d"
        fi
    done
    [ -z "$stopped" ] || step "configuration changed: stopped$stopped"
    rm -f "$STARTED_HASH"
fi

if pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    step "slurmdbd already running"
else
    slurmdbd
    step "started slurmdbd"
fi
wait_for 30 "slurmdbd to answer sacctmgr" sacctmgr -n -P show cluster
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    step "added cluster $CLUSTER_NAME to the accounting database"
fi

if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    step "slurmctld already running"
else
    slurmctld -c   # -c: drop jobs left by an earlier, killed run
    step "started slurmctld"
fi
wait_for 30 "slurmctld to answer" scontrol ping

# --- one slurmd per node
# Two-node mode: `nsenter --net` (not `ip netns exec`, which remounts /sys so that slurmd finds
# no /sys/fs/cgroup and refuses to start) and `unshare --uts` give each slurmd, and every job
# step it starts, the node's own address and host name. -D: it stays in the foreground of
# the background process whose pid is recorded (nsenter and unshare exec, they do not fork).
if [ "$MODE" = multi ]; then
    node_list=("${NODE_NAMES[@]}")
else
    node_list=("$HOST")
fi
for node in "${node_list[@]}"; do
    pidfile="$RUN_DIR/slurmd-$node.pid"
    if pid_alive "$pidfile" slurmd; then
        step "slurmd $node already running"
        continue
    fi
    mkdir -p "/var/spool/slurmd/$node"
    if [ "$MODE" = multi ]; then
        setsid nsenter --net="/run/netns/$NS_PREFIX$node" unshare --uts \
            sh -c "hostname $node && exec slurmd -D -N $node" \
            </dev/null >>"$LOG_DIR/slurmd-$node.out" 2>&1 &
        echo $! >"$pidfile"
    else
        slurmd -N "$node"   # daemonises; writes $pidfile (SlurmdPidFile=slurmd-%n.pid)
    fi
    step "started slurmd $node"
done
echo "$config_hash" >"$STARTED_HASH"
echo "$MODE" >"$MODE_FILE"

# --- every node must be idle (or busy with jobs) before anyone submits
nodes_ready() {
    local node state ready=0
    for node in "${node_list[@]}"; do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -n1)
        case "$state" in
            idle|mixed|allocated|completing) ;;
            down*|drain*|inval*)
                scontrol update nodename="$node" state=resume >/dev/null 2>&1; ready=1 ;;
            *) ready=1 ;;
        esac
    done
    return $ready
}
for node in "${node_list[@]}"; do
    pid_alive "$RUN_DIR/slurmd-$node.pid" slurmd || {
        sleep 0.5
        pid_alive "$RUN_DIR/slurmd-$node.pid" slurmd || fail "slurmd $node exited at start"
    }
done
wait_for 60 "nodes ${node_list[*]} to become idle" nodes_ready
wait_for 30 "cluster $CLUSTER_NAME in sacctmgr" \
    bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER_NAME"
step "cluster $CLUSTER_NAME ready ($MODE): $(sinfo -h -N -o '%N %T CPUs=%c Gres=%G' | sort -u \
    | paste -sd ';' | sed 's/;/; /g')"
