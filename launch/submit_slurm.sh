#!/usr/bin/env bash
# Submit a Slurm template with this repository's environment: launch/submit_slurm.sh TEMPLATE [sbatch args]
#   launch/submit_slurm.sh single_node --partition=gpu --time=08:00:00
#   DATA=/shared/data/nus OUT=/shared/runs/nus CODE_LENGTH=48 launch/submit_slurm.sh slurm/multi_node.sbatch --nodes=4
# TEMPLATE: a path, or a name in slurm/ (with or without .sbatch). The job runs in the repository root
# with VENV set to this repository's environment; the template's knobs (DATA, OUT, ...) pass through the
# environment. Logs: slurm/logs/<job name>-<job id>.out.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; setup_all
cd "$REPO_ROOT"
[ $# -ge 1 ] || die "usage: launch/submit_slurm.sh TEMPLATE [sbatch args]; templates: $(cd slurm && ls ./*.sbatch | tr '\n' ' ')"
TEMPLATE="$1"; shift
for candidate in "$TEMPLATE" "slurm/$TEMPLATE" "slurm/$TEMPLATE.sbatch"; do
  if [ -f "$candidate" ]; then TEMPLATE="$candidate"; break; fi
done
[ -f "$TEMPLATE" ] || die "no template $TEMPLATE (looked for it as given, in slurm/, and with .sbatch)"
command -v sbatch >/dev/null || die "sbatch is not on PATH: run this on a Slurm login node"
mkdir -p slurm/logs
run env DIHN_REPO="$REPO_ROOT" VENV="$VENV" sbatch --chdir="$REPO_ROOT" "$@" "$TEMPLATE"
