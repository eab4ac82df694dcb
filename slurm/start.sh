#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munge, MariaDB, slurmdbd, slurmctld,
# slurmd) with two fake GPUs, for development and CI. Idempotent: daemons that are running
# with an unchanged configuration are left alone. Needs root and slurm/install.sh first.
# No systemd: daemons are started directly and stopped by slurm/stop.sh through pid files.
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
        "$LOG_DIR/slurmd.log"; do
        if [ -r "$f" ]; then
            echo "----- tail -n 25 $f" >&2
            tail -n 25 "$f" >&2
        fi
    done
    sinfo -N -l >&2 2>/dev/null || true
}
trap dump_logs EXIT

fail() { echo "slurm/start.sh: $*" >&2; exit 1; }

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
if ! getent hosts "$HOST" >/dev/null; then
    echo "127.0.0.1 $HOST" >>/etc/hosts
    step "added '127.0.0.1 $HOST' to /etc/hosts"
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
    sed -e "s/@HOST@/$HOST/g" -e "s/@CPUS@/$NODE_CPUS/g" -e "s/@MEMORY_MB@/$memory_mb/g" \
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
    stopped=""
    for d in slurmd slurmctld slurmdbd; do
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

if pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    step "slurmd already running"
else
    slurmd
    step "started slurmd"
fi
echo "$config_hash" >"$STARTED_HASH"

# --- the node must be idle (or busy with jobs) before anyone submits
node_ready() {
    local state
    state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1)
    case "$state" in
        idle|mixed|allocated|completing) return 0 ;;
        down*|drain*|inval*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
    esac
    return 1
}
wait_for 60 "node $HOST to become idle" node_ready
wait_for 30 "cluster $CLUSTER_NAME in sacctmgr" \
    bash -c "sacctmgr -n -P show cluster format=cluster | grep -qx $CLUSTER_NAME"
step "cluster $CLUSTER_NAME ready: node $HOST $(sinfo -h -N -n "$HOST" -o '%T CPUs=%c Gres=%G')"
