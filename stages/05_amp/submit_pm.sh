#!/bin/bash
#SBATCH --job-name=05_amp  # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: a GPU node (4 A100s)
#SBATCH --qos=shared               # a share of a node, not the whole node: see "Why shared" below
#SBATCH --nodes=1                  # one node
#SBATCH --ntasks=1                 # one training process
#SBATCH --gpus-per-task=1          # one of the node's 4 GPUs
#SBATCH --cpus-per-task=32         # 32 of the node's 128 CPU threads: a quarter, like the one GPU of four
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# Why shared: a job on the `regular` QOS gets, and is charged for, a whole node with 4 GPUs; this stage uses
# one. The `shared` QOS gives it a quarter of a node (1 GPU, 32 CPU threads), as NERSC's own one-GPU examples
# do. NERSC's QOS and charging pages give the current rules (https://docs.nersc.gov/jobs/policy/).
#
# Submit from the repository root, naming your account (and reservation, if any) on the command line;
# anything after the script name goes to train.py:
#   sbatch -A <account> [--reservation=<name>] stages/05_amp/submit_pm.sh --config default
set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so find the repository where you submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/05_amp/submit_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# Near the time limit: let train.py checkpoint at its next step, then put this job back in the queue.
# The requeued job runs this script again, and train.py resumes from the newest checkpoint.
checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; train.py checkpoints and stops"
  kill -USR1 "$train_pid"  # srun passes the signal on to train.py
  local code=0
  wait "$train_pid" || code=$?
  if [[ $code -eq 3 ]]; then  # 3: stopped early, with a checkpoint to resume from
    echo "$(date +%T) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"  # 0 if training had finished anyway (the signal came during its last moments): no requeue
}
trap checkpoint_and_requeue USR1

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}"
# srun runs in the background and the shell waits for it: a trap runs only once `wait` is interrupted.
srun "${TUTORIAL_PYTHON[@]}" stages/05_amp/train.py "$@" &
train_pid=$!
wait "$train_pid"
