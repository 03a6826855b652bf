#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel its jobs, then stop slurmd x2,
# slurmctld and munged found via the pid files in the state dir. Never fails.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
D="${CI_SLURM_DIR:-/tmp/ci-slurm}"
export SLURM_CONF="$D/slurm.conf"

pid_of() {  # pid from pid file, only if that process is really the daemon
  local pid; pid="$(cat "$D/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

# Job steps (slurmstepd) outlive slurmd, so cancel all jobs while the daemons
# are still up and wait (max ~15 s) until nothing is running any more.
if pid_of slurmctld slurmctld >/dev/null; then
  scancel -p debug 2>/dev/null
  for _ in $(seq 30); do
    [ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ] && break
    sleep 0.5
  done
fi

pids=()
for d in slurmd-node1:slurmd slurmd-node2:slurmd slurmctld:slurmctld munged:munged; do
  pid="$(pid_of "${d%%:*}" "${d#*:}")" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  rm -f "$D/${d%%:*}.pid"
done
for _ in $(seq 30); do   # wait max ~15 s, then force
  left=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
  [ "$left" = 0 ] && break
  sleep 0.5
done
for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
echo "ci-slurm stopped"
exit 0
