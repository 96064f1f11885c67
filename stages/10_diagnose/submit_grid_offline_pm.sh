#!/bin/bash
#SBATCH --job-name=10_grid         # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=regular              # whole nodes (or --qos=debug: up to 30 min, a short wait, for trying things)
#SBATCH --nodes=1                  # one node per grid point
#SBATCH --ntasks-per-node=4        # one training process per GPU
#SBATCH --gpus-per-node=4          # all 4 GPUs; every process sees all 4 and takes the one of its local rank
#SBATCH --cpus-per-task=32         # the node's 128 CPU threads shared by the 4 processes, for their data workers
#SBATCH --time=00:30:00            # wall-clock limit per grid point: the job is killed after this
#SBATCH --array=0-5                # the 6 points of sweep.yaml's grid, one per array task
#SBATCH --output=slurm-%x-%A_%a.out  # one log per point: slurm-<name>-<array job id>_<point>.out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# The offline alternative to W&B's sweep server, for nodes without network: the grid of sweep.yaml as a job
# array, each task one point (its SLURM_ARRAY_TASK_ID), logged offline to sync later with `wandb sync`. It runs
# a fixed grid only: no random or Bayesian search, no early stopping, no live W&B sweep page. Submit from the
# repository root (anything after the script name goes to every train.py):
#   sbatch -A <account> stages/10_diagnose/submit_grid_offline_pm.sh
#   python stages/10_diagnose/sweeps.py grid stages/10_diagnose/sweep.yaml   # which point is which
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/10_diagnose/submit_grid_offline_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
export OMP_NUM_THREADS=1
# Each process next to its GPU (see submit_pm.sh)
export TUTORIAL_GPU_ORDER=3,2,1,0
# This point's train.py arguments, one per line: its settings, and a folder named after them, so that a
# requeued task resumes its own point.
arguments=$("${TUTORIAL_PYTHON[@]}" stages/10_diagnose/sweeps.py grid stages/10_diagnose/sweep.yaml \
  --index "${SLURM_ARRAY_TASK_ID:-0}")  # a bad index stops the job here (set -e), with sweeps.py's error
mapfile -t point <<< "$arguments"

checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; train.py checkpoints and stops"
  kill -USR1 "$train_pid"
  local code=0
  wait "$train_pid" || code=$?
  if [[ $code -eq 3 ]]; then
    echo "$(date +%T) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"
}
trap checkpoint_and_requeue USR1

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, grid point ${SLURM_ARRAY_TASK_ID:-0}: ${point[*]}"
# --wait=30, --kill-on-bad-exit=0: as in submit_pm.sh
srun --wait=30 --kill-on-bad-exit=0 --cpu-bind=cores "${TUTORIAL_PYTHON[@]}" stages/10_diagnose/train.py "${point[@]}" "$@" &
train_pid=$!
wait "$train_pid"
