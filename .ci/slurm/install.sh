#!/usr/bin/env bash
# Install a local Slurm + munge from Debian packages (bookworm: Slurm 22.05).
# Idempotent: apt is skipped entirely when the daemons and sbatch are on PATH.
# --check: install nothing, exit 0 when installed and 1 when not.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # daemons live in /usr/sbin

missing=0
for b in slurmctld slurmd sbatch munged; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "${1:-}" = --check ]; then
  exit "$missing"
fi
if [ "$missing" = 0 ]; then
  echo "slurm already installed: $(slurmd -V)"   # sbatch -V needs a slurm.conf
  exit 0
fi

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# slurm-wlm = slurmctld + slurmd; slurm-client = sbatch/srun/squeue/scontrol.
# The packages' systemd units are not used (start.sh runs the daemons itself).
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm slurm-client munge
echo "installed: $(slurmd -V)"
