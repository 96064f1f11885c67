#!/bin/bash
#SBATCH --job-name=03_checkpoint_restart  # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: a GPU node (4 A100s)
#SBATCH --qos=regular              # or debug (at most 30 min, starts sooner)
#SBATCH --nodes=1                  # one node
#SBATCH --ntasks-per-node=1        # one training process
#SBATCH --gpus-per-node=1          # this stage uses one GPU
#SBATCH --cpus-per-task=32         # a quarter of the node's CPU cores, for this process
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# Submit from the repository root, naming your account (and reservation, if any) on the command line;
# anything after the script name goes to train.py:
#   sbatch -A <account> [--reservation=<name>] stages/03_checkpoint_restart/submit_pm.sh --config default
set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so find the repository where you submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/03_checkpoint_restart/submit_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# Near the time limit: let train.py checkpoint at its next step, then put this job back in the queue.
# The requeued job runs this script again, and train.py resumes from the newest checkpoint.
checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; train.py checkpoints, then job $SLURM_JOB_ID is requeued"
  kill -USR1 "$train_pid"  # srun passes the signal on to train.py
  wait "$train_pid" || true
  scontrol requeue "$SLURM_JOB_ID"
}
trap checkpoint_and_requeue USR1

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}"
# srun runs in the background and the shell waits for it: a trap runs only once `wait` is interrupted.
srun "${TUTORIAL_PYTHON[@]}" stages/03_checkpoint_restart/train.py "$@" &
train_pid=$!
wait "$train_pid"
