#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the sbatch scripts without a cluster.
#
#   slurm/local_cluster.sh start     # installs slurm-wlm + munge with apt-get if missing (root), starts the daemons
#   eval "$(slurm/local_cluster.sh env)"   # SLURM_CONF (and a sacct stand-in on PATH) for this shell
#   slurm/local_cluster.sh stop      # stops only the daemons this script started (by their PID files)
#
# Everything lives in $LDM_SLURM_DIR (default /tmp/ldm-slurm): slurm.conf, a private munge key and socket,
# state, spool, logs and PID files, so a system SLURM or munge on the machine is left alone.
# Settings measured to start slurm-wlm 22.05 in about a second as root in a container: process tracking by
# /proc (no cgroups), CPUs as the consumable resource, no accounting daemon. task/affinity binds each task to
# its CPUs with sched_setaffinity (no cgroups needed), as real clusters do, so a test sees the CPUs a rank gets.
set -euo pipefail

DIR=${LDM_SLURM_DIR:-/tmp/ldm-slurm}
CPUS=${LDM_SLURM_CPUS:-2}
PORT=${LDM_SLURM_PORT:-16817}           # slurmctld; slurmd uses PORT+1
NODE=$(hostname -s)
CONF=$DIR/slurm.conf

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "local_cluster.sh: must run as root (slurmd launches jobs as their owner)" >&2
        exit 77
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
            && command -v sbatch >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || { echo "local_cluster.sh: no apt-get to install slurm-wlm and munge" >&2; exit 77; }
    echo "[local_cluster] installing slurm-wlm and munge with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$DIR/apt.log" 2>&1 || {
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$DIR/apt.log" 2>&1
    } || { echo "local_cluster.sh: apt-get install slurm-wlm munge failed, see $DIR/apt.log" >&2; exit 77; }
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: one node, $CPUS CPUs, on 127.0.0.1.
ClusterName=ldmlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
# Short waits so that tests do not sit idle: SIGTERM -> SIGKILL after 5 s, a requeued job is released with
# scontrol update jobid=N StartTime=now (SLURM otherwise holds it for about two minutes).
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

write_sacct() {
    # No accounting daemon here, so the real sacct fails; submitit polls it for job states. This stand-in
    # answers the one query submitit makes (-o JobID,State,NodeList --parsable2 -j IDS) from scontrol, which
    # remembers finished jobs for MinJobAge seconds.
    mkdir -p "$DIR/bin"
    cat >"$DIR/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
ids=""
while [ $# -gt 0 ]; do case "$1" in -j) ids=$2; shift ;; esac; shift; done
echo "JobID|State|NodeList"
for id in ${ids//,/ }; do
    scontrol show job -o "$id" 2>/dev/null | while read -r line; do
        field() { grep -o " $1=[^ ]*" <<<" $line" | head -1 | cut -d= -f2-; }
        jid=$(field JobId)
        [ -n "$(field ArrayTaskId)" ] && jid=$(field ArrayJobId)_$(field ArrayTaskId)
        echo "$jid|$(field JobState)|$(field NodeList)"
    done
done
SACCT
    chmod +x "$DIR/bin/sacct"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    need_root
    mkdir -p "$DIR"
    install
    write_sacct
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        echo "[local_cluster] already running (SLURM_CONF=$CONF)" >&2
        return
    fi
    write_conf
    if ! alive "$DIR/munged.pid"; then
        [ -f "$DIR/munge.key" ] || { head -c 1024 /dev/urandom >"$DIR/munge.key"; chmod 400 "$DIR/munge.key"; }
        munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
            --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed"
    fi
    export SLURM_CONF=$CONF
    alive "$DIR/slurmctld.pid" || slurmctld -i
    alive "$DIR/slurmd.pid" || slurmd
    for _ in $(seq 1 100); do
        if sinfo -h -o %t 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then
            echo "[local_cluster] up: SLURM_CONF=$CONF (node $NODE, $CPUS CPUs)" >&2
            return
        fi
        sleep 0.1
    done
    echo "local_cluster.sh: the node did not come up; logs in $DIR/log" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
    export SLURM_CONF=$CONF
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then
        # Cancel what is left and let slurmd see its job steps out; stopped first, they would be orphaned.
        squeue -h -o %A 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 1 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
    fi
    for daemon in slurmd slurmctld munged; do
        pidfile=$DIR/$daemon.pid
        if alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$pidfile"
    done
    # Job step daemons of this cluster that outlived slurmd (their environment names our slurm.conf).
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    echo "[local_cluster] stopped" >&2
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
