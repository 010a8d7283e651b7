# Shell logic shared by the slurm/*.sbatch templates. Sourced, not executed:
#   source "${DIHN_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
#
# Knobs (environment variables; sbatch passes the submitting shell's environment by default):
#   DIHN_REPO      the repository (default: the folder above this file)
#   VENV           virtual environment to activate (default: $DIHN_REPO/.venv; "none": use the PATH as is)
#   RDZV_PORT      torchrun c10d rendezvous port on the head node (default: 29500 + job id mod 10000)
#   MAX_RESTARTS   torchrun restarts of failed workers within one attempt (default 0; each restart resumes)
#   STOP_GRACE_S   seconds the USR1 handler waits for the training step to stop before requeueing (default 90)
#   NUM_WORKERS    FFCV loader threads per process (default: the trainer's own rule, the CPUs Slurm gave the
#                  task divided by the processes on the node; torch threads follow the same rule)
#   EXTRA_ARGS     more arguments for python -m dihn_dist.train (word-split)
#
# Preemption: the templates ask for `--signal=B:USR1@120` and `--requeue`. Slurm sends SIGUSR1 to this
# batch shell only, 120 s before the time limit (or on `scancel --signal=USR1 --batch JOBID`). The trap
# below sends SIGTERM to the step's tasks (scancel --signal=TERM: the torchrun agent on every node); the
# agent stops its workers (SIGTERM, SIGKILL after 30 s) and exits, and so does srun. The trainer checkpoints
# the outer iteration it stopped after at once (atomically), so at most the iteration in progress is lost. Then the shell runs
# `scontrol requeue $SLURM_JOB_ID`; the next attempt (SLURM_RESTART_COUNT=1, 2, ...) runs the same
# command, which always has --resume, and continues from RUN_DIR/checkpoints/<stage>.pt. A SIGUSR1 must
# not reach torchrun's agent directly (it would kill the agent, not stop the workers): hence `B:`, and
# PET_SIGNALS_TO_HANDLE below makes the agent treat SIGUSR1 like SIGTERM should one reach it anyway.

set -euo pipefail

DIHN_REPO="${DIHN_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

dihn_log() { printf '[dihn_dist slurm %s] %s\n' "$(date '+%F %T')" "$*" >&2; }
dihn_die() { dihn_log "ERROR: $*"; exit 2; }

# The command as it will run, shell-quoted, on one line.
dihn_quote() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }

dihn_require_job() {
  [ -n "${SLURM_JOB_ID:-}" ] || dihn_die "not inside a Slurm job: submit this template with sbatch (or launch/submit_slurm.sh)"
  command -v scontrol >/dev/null || dihn_die "scontrol is not on PATH on $(hostname)"
}

dihn_activate() {
  local venv="${VENV:-$DIHN_REPO/.venv}"
  if [ "$venv" != none ]; then
    [ -f "$venv/bin/activate" ] || dihn_die "no virtual environment at $venv: run launch/setup.sh on storage every node sees, or set VENV=/path/to/venv (VENV=none uses the PATH as is)"
    set +u  # activate scripts are not written for set -u
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    set -u
  fi
  python -c 'import dihn_dist' 2>/dev/null \
    || dihn_die "python ($(command -v python || echo 'not found')) cannot import dihn_dist: install it with launch/setup.sh or point VENV at an environment that has it"
}

dihn_head_node() { scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n1; }

dihn_banner() {
  dihn_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} node(s): ${SLURM_JOB_NODELIST:-?}; CPUs per task ${SLURM_CPUS_PER_TASK:-unset}; GPUs per node ${GPUS_PER_NODE:-0}"
}

# --- running a step so that a preemption signal stops it and requeues the job ------------------------

DIHN_STEP_PID=""
DIHN_TRAPPED=0
DIHN_PREEMPTED=0
DIHN_WATCHDOG_PID=""

# SIGTERM to the step's tasks (the torchrun agents) through Slurm, not to srun: srun treats its own SIGTERM
# as "cancel the step" and kills the tasks at once, while torchrun's agent on SIGTERM stops its workers
# in order (SIGTERM, then SIGKILL after its shutdown timeout). Without --full/--batch, scancel leaves the
# batch shell alone.
dihn_stop_step() {
  if [ -n "$DIHN_STEP_PID" ] && kill -0 "$DIHN_STEP_PID" 2>/dev/null; then
    dihn_log "+ scancel --signal=TERM ${SLURM_JOB_ID} (SIGTERM to torchrun on every node; it stops its workers)"
    scancel --signal=TERM "${SLURM_JOB_ID}" 2>/dev/null \
      || { dihn_log "scancel failed: SIGTERM to srun (pid $DIHN_STEP_PID) instead"; kill -TERM "$DIHN_STEP_PID" 2>/dev/null || true; }
  fi
}

dihn_on_usr1() {
  DIHN_TRAPPED=1
  DIHN_PREEMPTED=1
  dihn_log "SIGUSR1: time limit or preemption ahead; stopping the training step, then requeueing job ${SLURM_JOB_ID} (the next attempt resumes from the last checkpoint)"
  dihn_stop_step
  # Bound the wait: whatever happens, requeue before the time limit ends the job for good.
  if [ -n "$DIHN_STEP_PID" ] && [ -z "$DIHN_WATCHDOG_PID" ]; then
    ( sleep "${STOP_GRACE_S:-90}"; dihn_log "the step did not stop within ${STOP_GRACE_S:-90} s: SIGKILL"; kill -KILL "$DIHN_STEP_PID" 2>/dev/null ) &
    DIHN_WATCHDOG_PID=$!
  fi
}

dihn_on_term() {
  DIHN_TRAPPED=1
  dihn_log "SIGTERM: Slurm is ending this attempt (scancel, requeue or time limit)"
  if [ -z "$DIHN_STEP_PID" ]; then exit 143; fi
  dihn_stop_step
}

dihn_requeue() {
  dihn_log "+ scontrol requeue ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}" \
    || dihn_die "scontrol requeue ${SLURM_JOB_ID} failed: resubmit the same command; it resumes from its run folder"
  dihn_log "job ${SLURM_JOB_ID} requeued"
  exit 0
}

# Run "$@" (an srun command) in the background and wait for it, handling SIGUSR1/SIGTERM meanwhile.
# Returns the step's exit status; after a SIGUSR1 it requeues the job and exits instead.
dihn_run_step() {
  # A SIGUSR1 that came while the template did something else (it ran when that command ended).
  if [ "$DIHN_PREEMPTED" = 1 ]; then dihn_requeue; fi
  dihn_log "+ $(dihn_quote "$@")"
  local started=$SECONDS rc="" status
  "$@" &
  DIHN_STEP_PID=$!
  while :; do
    DIHN_TRAPPED=0
    status=0
    wait "$DIHN_STEP_PID" || status=$?
    # 127: an earlier `wait` had already collected the step's status (a trap ran just after it).
    if [ "$status" = 127 ] && [ -n "$rc" ]; then break; fi
    rc=$status
    # A trap interrupts `wait` (status > 128) even while the step runs on: wait again for its real status.
    [ "$DIHN_TRAPPED" = 1 ] || break
  done
  if [ -n "$DIHN_WATCHDOG_PID" ]; then kill "$DIHN_WATCHDOG_PID" 2>/dev/null || true; fi
  DIHN_STEP_PID=""
  DIHN_WATCHDOG_PID=""
  dihn_log "training step ended with exit status $rc after $(( SECONDS - started )) s"
  if [ "$DIHN_PREEMPTED" = 1 ]; then
    if [ "$rc" = 0 ]; then
      dihn_log "the step finished its work before it could be stopped: nothing to requeue"
      return 0
    fi
    dihn_requeue
  fi
  return "$rc"
}

# Installed as soon as a template sources this file, so a signal during data checks or preparation is
# not lost (bash runs the trap when the current foreground command ends).
trap dihn_on_usr1 USR1
trap dihn_on_term TERM

# --- torchrun on every node of the allocation ----------------------------------------------------------

# The step's GPU request: every GPU the job has on a node, for the one task (torchrun) there; nothing when
# the job has no GPUs. Asked for explicitly, as --cpus-per-task is: whether a step inherits the job's GPUs
# without asking depends on the Slurm version and site configuration, and a step without them would see
# no GPU at all (torch.cuda.is_available() false: --device cuda refused).
dihn_step_gpus() {
  local gpus="${SLURM_GPUS_ON_NODE:-0}"
  if [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then echo "--gpus-per-node=$gpus"; fi
}

# dihn_torchrun PROCESSES_PER_NODE TRAIN_ARGS...: one srun task per node, each running
#   torchrun --nnodes $SLURM_NNODES --nproc_per_node PROCESSES_PER_NODE --rdzv_backend c10d
#            --rdzv_endpoint <head node>:<port> -m dihn_dist.train --resume TRAIN_ARGS...
# Each process takes its share of the task's CPUs (loader and torch threads) by itself.
dihn_torchrun() {
  local nproc="$1"; shift
  local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
  local head port
  head="$(dihn_head_node)"
  port="${RDZV_PORT:-$(( 29500 + ${SLURM_JOB_ID} % 10000 ))}"
  # If SIGUSR1 ever reaches an agent (e.g. --signal without B:), stop the workers instead of dying.
  export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  # The trainer finishes and checkpoints its current outer iteration on SIGTERM: give it the grace period
  # before torchrun escalates to SIGKILL.
  export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-${STOP_GRACE_S:-90}}"
  local -a extra=()
  read -r -a extra <<< "${EXTRA_ARGS:-}"
  [ -z "${NUM_WORKERS:-}" ] || extra=(--num-workers "${NUM_WORKERS:-}" "${extra[@]}")
  local -a step=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # Slurm 22.05+ srun does not inherit sbatch's --cpus-per-task: pass it on.
  [ -z "${SLURM_CPUS_PER_TASK:-}" ] || step+=(--cpus-per-task="${SLURM_CPUS_PER_TASK:-}")
  local gpus
  gpus="$(dihn_step_gpus)"
  [ -z "$gpus" ] || step+=("$gpus")
  dihn_run_step "${step[@]}" \
    torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" \
      --rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "dihn-${SLURM_JOB_ID}" \
      --max_restarts "${MAX_RESTARTS:-0}" \
      -m dihn_dist.train --resume "$@" "${extra[@]}"
}
