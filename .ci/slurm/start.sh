#!/usr/bin/env bash
# Start a private two-node Slurm cluster "ci" on this host: munged, slurmctld
# and one slurmd each for node1 and node2. All state, logs and the generated
# slurm.conf live in $CI_SLURM_DIR (default /tmp/ci-slurm). Prints
# `export SLURM_CONF=...` and writes it to $CI_SLURM_DIR/env.sh.
# Idempotent: a healthy running cluster is reused as is. Must run as root.
#   CI_SLURM_PORT        slurmctld port (default 6817); node1/node2 use +1/+2
#   CI_SLURM_CRED_EXPIRE requeue delay in seconds (default 10), see AuthInfo
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
D="${CI_SLURM_DIR:-/tmp/ci-slurm}"
PORT="${CI_SLURM_PORT:-6817}"
CONF="$D/slurm.conf"
ENV_LINE="export SLURM_CONF=$CONF"
export SLURM_CONF="$CONF"
HERE="$(cd "$(dirname "$0")" && pwd)"

# pid file present, process alive and really ours (guards against pid reuse)
alive() {
  local pid; pid="$(cat "$D/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# both nodes registered and usable (idle or running jobs), none down/drained
nodes_ok() {
  [ "$(sinfo -h -N -p debug -t "$1" -o '%N' 2>/dev/null | sort -u | wc -l)" = 2 ]
}
fail() {
  echo "ci-slurm: $*" >&2
  sinfo -N -l >&2 || true
  for f in "$D"/*.log; do [ -f "$f" ] && { echo "==== $f" >&2; tail -n 40 "$f" >&2; }; done
  exit 1
}

if [ -f "$CONF" ] && alive munged munged && alive slurmctld slurmctld \
   && alive slurmd-node1 slurmd && alive slurmd-node2 slurmd \
   && nodes_ok idle,alloc,mix,comp; then
  echo "$ENV_LINE"; exit 0
fi

# Not (fully) running: stop leftovers of an earlier start and wipe the state
# dir, so stale pid files, job state or spool dirs cannot break the new cluster.
# Safety: never wipe a non-empty dir that this script did not create.
if [ -n "$(ls -A "$D" 2>/dev/null)" ] && [ ! -f "$D/slurm.conf" ] && [ ! -f "$D/munged.pid" ]; then
  echo "ci-slurm: $D is not empty and not a ci-slurm state dir; refusing to wipe it" >&2; exit 1
fi
CI_SLURM_DIR="$D" "$HERE/stop.sh" >/dev/null 2>&1 || true
rm -rf "$D"
mkdir -p "$D/ctld" "$D/munge" "$D/node1" "$D/node2"

# slurmd/srun/slurmstepd resolve node names; map them to loopback.
for n in node1 node2; do
  grep -qE "^[^#]*[[:space:]]$n([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
done

# Private munged with its own key and socket (a system munge, if any, is left
# alone); Slurm finds the socket via AuthInfo. munged rejects a key readable by
# others and a socket dir writable by others; 755 lets non-root users submit.
MSOCK="$D/munge/munge.socket"
dd if=/dev/urandom of="$D/munge.key" bs=1024 count=1 status=none
chmod 400 "$D/munge.key"
chmod 755 "$D/munge"
munged --force --key-file="$D/munge.key" --socket="$MSOCK" --pid-file="$D/munged.pid" \
  --log-file="$D/munged.log" --seed-file="$D/munged.seed" || fail "munged failed to start"

cat > "$CONF" <<CONF
ClusterName=ci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job must wait before
# it can start again; keep it short so requeue round trips are fast.
AuthInfo=socket=$MSOCK,cred_expire=${CI_SLURM_CRED_EXPIRE:-10}
StateSaveLocation=$D/ctld
SlurmctldPidFile=$D/slurmctld.pid
SlurmctldLogFile=$D/slurmctld.log
# %n = node name: each slurmd gets its own spool dir, pid file and log.
SlurmdSpoolDir=$D/%n
SlurmdPidFile=$D/slurmd-%n.pid
SlurmdLogFile=$D/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups and no accounting (sacct won't work; use scontrol show job).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# Run the scheduler every 2 s (default 60 s / backfill 30 s) so requeued jobs
# restart soon after their BeginTime passes.
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
JobRequeue=1
KillWait=5
# finished jobs stay visible in squeue/scontrol for 5 minutes
MinJobAge=300
# a DOWN node returns to service as soon as its slurmd registers again
ReturnToService=2
# Both nodes share the machine's 2 cores; memory is not enforced (CR_Core).
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT+1)) CPUs=2 RealMemory=8000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT+2)) CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
# the same nodes again, for the tests of a stage sent to a partition of its own (--prep-partition cpu)
PartitionName=cpu Nodes=node1,node2 Default=NO MaxTime=INFINITE State=UP
CONF

slurmctld -f "$CONF" || fail "slurmctld failed to start"
# -N: run this slurmd as the given node (several slurmd on one host)
slurmd -f "$CONF" -N node1 || fail "slurmd node1 failed to start"
slurmd -f "$CONF" -N node2 || fail "slurmd node2 failed to start"

for _ in $(seq 120); do
  if nodes_ok idle; then
    echo "$ENV_LINE" > "$D/env.sh"
    echo "$ENV_LINE"; exit 0
  fi
  sleep 0.5
done
fail "nodes not idle after 60 s"
