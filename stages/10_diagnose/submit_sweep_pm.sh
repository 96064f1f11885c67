#!/bin/bash
#SBATCH --job-name=10_sweep        # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=regular              # whole nodes (or --qos=debug: up to 30 min, a short wait, for trying things)
#SBATCH --nodes=1                  # one node per trial
#SBATCH --ntasks-per-node=4        # one training process per GPU
#SBATCH --gpus-per-node=4          # all 4 GPUs; every process sees all 4 and takes the one of its local rank
#SBATCH --cpus-per-task=32         # the node's 128 CPU threads shared by the 4 processes, for their data workers
#SBATCH --time=00:30:00            # wall-clock limit per trial (per array task): the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log of each job (each array task is a job of its own, with its own id)
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# One trial of a W&B sweep per job. Create the sweep once (`wandb sweep stages/10_diagnose/sweep.yaml`
# prints its id), then submit from the repository root; --array starts that many trials at once, one per task:
#   sbatch -A <account> stages/10_diagnose/submit_sweep_pm.sh <entity>/<project>/<sweep_id>
#   sbatch -A <account> --array=0-5 stages/10_diagnose/submit_sweep_pm.sh <entity>/<project>/<sweep_id>
# At the job's first start, rank 0 runs `wandb agent --count 1`, which hands it a trial; rank 0 saves the
# trial's settings and sends them to the other ranks. Near the time limit the trial checkpoints and the job
# requeues itself; the requeued job (same job id) continues that trial instead of asking for a new one.
# The compute nodes need network to reach W&B (Perlmutter's have it); without, see submit_grid_offline_pm.sh.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/10_diagnose/submit_sweep_pm.sh <sweep_id>" >&2
  exit 1
fi
if [[ $# -ne 1 ]]; then
  echo "error: give the sweep id that 'wandb sweep stages/10_diagnose/sweep.yaml' printed, and nothing else" >&2
  exit 1
fi
source slurm/setup_env.sh

# Where the processes meet: as in submit_pm.sh.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
export OMP_NUM_THREADS=1
# Each process next to its GPU (see submit_pm.sh)
export TUTORIAL_GPU_ORDER=3,2,1,0

checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; the trial checkpoints and stops"
  kill -USR1 "$train_pid"  # srun passes it to every process of the step; the W&B agent ignores it
  local code=0
  wait "$train_pid" || code=$?
  if [[ $code -eq 3 ]]; then  # 3: the trial stopped early, with a checkpoint to resume from
    echo "$(date +%T) requeueing job $SLURM_JOB_ID: it will continue the same trial"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"
}
trap checkpoint_and_requeue USR1

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, sweep $1, $SLURM_NTASKS processes"
# Every task runs sweeps.py: on rank 0 it starts the agent (or, after a requeue, the saved trial); on the others
# train.py, which waits for the trial from rank 0.
# --wait=30, --kill-on-bad-exit=0: as in submit_pm.sh
srun --wait=30 --kill-on-bad-exit=0 --cpu-bind=cores "${TUTORIAL_PYTHON[@]}" stages/10_diagnose/sweeps.py task "$1" &
train_pid=$!
wait "$train_pid"
