#!/usr/bin/env bash
# data2vec 2.0 pretraining launcher: sbatch (multi-node), the deepspeed launcher, or torchrun.
#
#SBATCH --job-name=d2v2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=d2v2-%j.out
# SIGUSR1 to this script 5 minutes before the time limit: the ranks finish their step, checkpoint
# and exit, then the script requeues the job.  300 s must cover one training step plus one
# checkpoint save (measured in docs/BENCHMARKS.md, "Preemption"): raise it for models whose save
# takes longer, and keep --grace (what the script waits for the ranks) below it.
#SBATCH --signal=B:USR1@300
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launchers/pretrain.sh [options] [section.key=VALUE ...]

Runs d2v2-train (python -m d2v2_scale.train) with --resume auto, so a requeued or restarted job
continues from the newest complete checkpoint in the output directory.

How it starts the processes (--mode, default: slurm inside a SLURM allocation, else torchrun):
  slurm      one task per GPU with srun; rank, world size and master address come from SLURM
             (MASTER_ADDR = first host of `scontrol show hostnames`, MASTER_PORT from the job id).
             Submit with: sbatch --nodes N --ntasks-per-node G launchers/pretrain.sh --preset ...
  torchrun   torchrun --nproc_per_node NPROC on this machine (--nproc, default: all GPUs or 2 on CPU)
  deepspeed  the deepspeed launcher with --hostfile FILE (default: one machine, --nproc slots;
             MASTER_PORT, when set, is its --master_port)

Options (each also settable as an environment variable, in capitals, e.g. PRESET=image-base):
  --preset NAME         model/recipe preset (image-base, image-large, image-huge, audio-base,
                        audio-large, text-base, text-large, *-tiny)          [PRESET]
  --manifest PATH       data manifest written by d2v2-prep                  [MANIFEST]
  --output-dir DIR      logs, TensorBoard, checkpoints                       [OUTPUT_DIR]
  --config FILE         YAML config merged over the preset                   [CONFIG]
  --ds-config FILE      DeepSpeed JSON (ds_configs/zero3.json, ...)          [DS_CONFIG]
  --mode MODE           slurm | torchrun | deepspeed                         [MODE]
  --nproc N             processes per node for torchrun/deepspeed            [NPROC]
  --hostfile FILE       hostfile for the deepspeed launcher                  [HOSTFILE]
  --python PATH         python to run (default: python3 on PATH)             [PYTHON]
  --no-requeue          on SIGUSR1/SIGTERM checkpoint and exit without scontrol requeue [REQUEUE=0]
  --grace SECONDS       after SIGUSR1/SIGTERM, how long the ranks get to finish their step and
                        write the checkpoint before they are killed (default 270)  [GRACE]
  -h, --help            this text
The #SBATCH lines above are for 8-GPU nodes; sbatch options on the command line win, e.g.
  sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 launchers/pretrain.sh --preset image-large ...
Environment: OMP_NUM_THREADS (default 1), PYTHONUNBUFFERED=1 are exported to the processes.

Everything else (e.g. parallel.tp=2 parallel.zero_stage=3 max_steps=1000) is passed to d2v2-train
as a config override.

Preemption: SIGUSR1 or SIGTERM to this script (with `#SBATCH --signal=B:USR1@300` SLURM sends
USR1 ahead of the time limit) reaches every training process as SIGUSR1 (through srun in slurm
mode; directly, not through torchrun or the deepspeed launcher, in the other modes); they finish
the current step, write a checkpoint and exit; the script waits up to --grace seconds for that.
Under SLURM it then runs `scontrol requeue $SLURM_JOB_ID`; the requeued job (or the same command
run again) resumes from that checkpoint.
Exit code: 0 when training finished; 75 (EX_TEMPFAIL) when it was preempted after a complete
checkpoint: requeue, or run the same command again; otherwise the training processes' failure.
EOF
}

PRESET=${PRESET:-}; MANIFEST=${MANIFEST:-}; OUTPUT_DIR=${OUTPUT_DIR:-}; CONFIG=${CONFIG:-}
DS_CONFIG=${DS_CONFIG:-}; MODE=${MODE:-}; NPROC=${NPROC:-}; HOSTFILE=${HOSTFILE:-}
PYTHON=${PYTHON:-python3}; REQUEUE=${REQUEUE:-1}; GRACE=${GRACE:-270}
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --preset) PRESET=$2; shift 2 ;;
    --manifest) MANIFEST=$2; shift 2 ;;
    --output-dir) OUTPUT_DIR=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --ds-config) DS_CONFIG=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-requeue) REQUEUE=0; shift ;;
    --grace) GRACE=$2; shift 2 ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done

[ -n "$PRESET$CONFIG" ] || { echo "pretrain.sh: give --preset or --config (see --help)" >&2; exit 2; }
[ -n "$MANIFEST" ] || { echo "pretrain.sh: give --manifest PATH/manifest.json (make it with d2v2-prep)" >&2; exit 2; }
[ -f "$MANIFEST" ] || { echo "pretrain.sh: manifest $MANIFEST does not exist" >&2; exit 2; }
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-d2v2}-${PRESET:-custom}}
if [ -z "$MODE" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then MODE=slurm; else MODE=torchrun; fi
fi

ARGS=(-m d2v2_scale.train --resume auto --output-dir "$OUTPUT_DIR" --data.manifest "$MANIFEST")
[ -n "$PRESET" ] && ARGS+=(--preset "$PRESET")
[ -n "$CONFIG" ] && ARGS+=(--config "$CONFIG")
[ -n "$DS_CONFIG" ] && ARGS+=(--parallel.ds_config "$DS_CONFIG")
ARGS+=("${OVERRIDES[@]}")

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTPUT_DIR"

if [ -z "$NPROC" ]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi

PREEMPTED_RC=75  # EX_TEMPFAIL: preempted after a checkpoint; requeue or rerun to continue
CHILD=

catches_usr1() {  # does process $1 handle SIGUSR1 (bit 10 of SigCgt in /proc/PID/status)?
  local mask
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$mask" ] && (( (16#$mask >> 9) & 1 ))
}

training_ranks() {  # the training processes under the launcher $1: they handle SIGUSR1 (d2v2-train
  # installs the handler first thing), their parent (torchrun, deepspeed's launch.py) does not;
  # that also leaves out their data-loader workers (children of a rank)
  local p kids
  kids=$(pgrep -P "$1" 2>/dev/null) || return 0
  for p in $kids; do
    if catches_usr1 "$p" && ! catches_usr1 "$1"; then echo "$p"; fi
    training_ranks "$p"
  done
}

preempt() {
  trap 'echo "pretrain.sh: $1 received again: still waiting for the checkpoint" >&2' USR1 TERM
  if [ -z "$CHILD" ]; then
    echo "pretrain.sh: $1 received before training started: exit $PREEMPTED_RC (run the command again)" >&2
    exit "$PREEMPTED_RC"
  fi
  echo "pretrain.sh: $1 received: asking the training processes to checkpoint and exit (up to ${GRACE}s)" >&2
  local helper=
  if [ "$MODE" = slurm ]; then
    kill -USR1 "$CHILD" 2>/dev/null || true  # srun forwards it to every task
  else
    # torchrun and the deepspeed launcher die on SIGUSR1 and take the ranks along (and stop them
    # on SIGTERM with a 30 s grace): signal the ranks themselves; one still starting up is
    # signalled as soon as its handler is in place
    # once each: a second USR1 could reach a rank in its interpreter's shutdown, where Python has
    # put the default action (death) back
    ( sent=" "; while :; do
        for p in $(training_ranks "$CHILD"); do
          case "$sent" in *" $p "*) ;; *) kill -USR1 "$p" 2>/dev/null || true; sent="$sent$p " ;; esac
        done
        sleep 1
      done ) &
    helper=$!
  fi
  ( sleep "$GRACE" & s=$!; trap 'kill $s; exit 0' TERM; wait $s; echo "pretrain.sh: the training processes did not exit within --grace ${GRACE}s:" \
      "killing them; the newest complete checkpoint is kept" >&2; kill -KILL "$CHILD" 2>/dev/null ) &
  local timer=$! rc=0
  wait "$CHILD" || rc=$?
  for p in $helper $timer; do kill "$p" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    echo "pretrain.sh: the training processes exited with $rc after the $1" >&2
    exit "$rc"
  fi
  if [ "$MODE" = slurm ] && [ "$REQUEUE" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "pretrain.sh: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  echo "pretrain.sh: preempted after a checkpoint in $OUTPUT_DIR: exit $PREEMPTED_RC; run the same" \
       "command again (it resumes with --resume auto) to continue" >&2
  exit "$PREEMPTED_RC"
}
trap 'preempt USR1' USR1
trap 'preempt TERM' TERM

case "$MODE" in
  slurm)
    [ -n "${SLURM_JOB_ID:-}" ] || { echo "pretrain.sh: --mode slurm needs a SLURM allocation (sbatch)" >&2; exit 2; }
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT
    # sbatch forwards the submitting shell's environment; torchrun-style variables left there
    # (RANK=0 WORLD_SIZE=1 from a notebook or an earlier single-process run) would win over
    # SLURM_PROCID/SLURM_NTASKS in every task and make each one a world of its own.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK TORCHELASTIC_RUN_ID
    echo "pretrain.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} nodes x" \
         "${SLURM_NTASKS_PER_NODE:-?} tasks, master $MASTER_ADDR:$MASTER_PORT, output $OUTPUT_DIR"
    # srun forwards SIGUSR1 to every task; each task's trainer checkpoints and exits.
    srun --kill-on-bad-exit=1 "$PYTHON" "${ARGS[@]}" &
    ;;
  torchrun)
    # the launcher itself ignores SIGUSR1 (a USR1 to the whole process group must not kill it
    # before the ranks save); the ranks install their own handler
    ( trap '' USR1; exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "${ARGS[@]}" ) &
    ;;
  deepspeed)
    DS=(--num_gpus "$NPROC")
    [ -n "$HOSTFILE" ] && DS=(--hostfile "$HOSTFILE")
    [ -n "${MASTER_PORT:-}" ] && DS+=(--master_port "$MASTER_PORT")
    ( trap '' USR1; exec "$PYTHON" -m deepspeed.launcher.runner "${DS[@]}" --module "${ARGS[@]:1}" ) &
    ;;
  *) echo "pretrain.sh: unknown --mode $MODE (slurm | torchrun | deepspeed)" >&2; exit 2 ;;
esac
CHILD=$!
wait "$CHILD"
