#!/usr/bin/env bash
# A one-node SLURM cluster for the tests, self-contained in one folder:
#   tests/slurm_cluster.sh start DIR   # installs slurm-wlm + munge if missing, writes DIR/slurm.conf, starts the daemons
#   tests/slurm_cluster.sh stop DIR    # stops the daemons it started (by the pids in DIR/*.pid)
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf (printed by start); nothing under /etc is
# changed, so several clusters (other test sessions on the same machine) can run side by side.
# Needs root (the daemons run as root; no cgroups, no accounting database).
set -euo pipefail

action=${1:?usage: $0 start|stop DIR}
dir=${2:?usage: $0 start|stop DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return
    echo "[slurm] installing slurm-wlm and munge"
    apt-get update -qq
    # the lock timeout: another apt-get on this machine may be running
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

write_config() {
    local node ctld_port slurmd_port
    # slurmd -C prints this machine's node line (CPUs, sockets, memory) as SLURM sees it
    node=$(slurmd -C | grep '^NodeName=')
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=mimtest
SlurmctldHost=$(hostname -s)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.daemon.pid
SlurmdPidFile=$dir/slurmd.daemon.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
PlugStackConfig=$dir/plugstack.conf
# no cgroups: plain process tracking, no task binding (containers rarely allow cgroup writes)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# run the scheduler every second (default 60 s), so a requeued job starts as soon as it is eligible
SchedulerParameters=sched_interval=1
# pre-empted or timed-out jobs may be requeued (submitit calls scontrol requeue)
JobRequeue=1
ReturnToService=2
# a killed job's processes get SIGKILL 5 s after SIGTERM (default 30 s): quick requeues in tests
KillWait=5
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "CgroupPlugin=autodetect" >"$dir/cgroup.conf"
    : >"$dir/plugstack.conf"
}

start_daemon() {  # name command...: start in the foreground of a new session, record its pid
    local name=$1
    shift
    setsid "$@" </dev/null >"$dir/$name.out" 2>&1 &
    echo $! >"$dir/$name.pid"
}

start() {
    install_packages
    write_config
    if [ ! -f "$dir/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$dir/munge.key"
    fi
    # --force: munged refuses to run as root otherwise
    start_daemon munged munged --foreground --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.daemon.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
    for _ in $(seq 50); do [ -S "$dir/munge.socket" ] && break; sleep 0.1; done
    export SLURM_CONF=$dir/slurm.conf
    start_daemon slurmctld slurmctld -D -c -f "$SLURM_CONF"
    start_daemon slurmd slurmd -D -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o %t 2>/dev/null)" = "idle" ] && timeout 20 srun -t 1 hostname >/dev/null 2>&1; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.5
    done
    echo "[slurm] the cluster did not come up; logs in $dir" >&2
    tail -n 20 "$dir"/*.log "$dir"/*.out >&2 || true
    stop
    return 1
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -f "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
