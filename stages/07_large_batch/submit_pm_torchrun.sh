#!/bin/bash
#SBATCH --job-name=07_large_batch_torchrun # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=regular              # whole nodes (or --qos=debug: up to 30 min, for trying things)
#SBATCH --nodes=1                  # one node; `sbatch -N 2 ...` asks for two
#SBATCH --ntasks-per-node=1        # one task per node: torchrun, which starts the 4 training processes itself
#SBATCH --gpus-per-node=4          # all 4 GPUs, for torchrun's 4 processes
#SBATCH --cpus-per-task=128        # all 128 CPU threads of the node, shared by the 4 processes and their workers
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#
# The same training as submit_pm.sh, launched by torchrun instead of srun: srun starts one torchrun per node,
# and the torchruns meet (a c10d rendezvous) on the job's first node, then each starts one process per GPU.
# It has no time-limit trap: torchrun does not pass USR1 on, and a SIGTERM to srun ends the job step at once.
# A job that hits its time limit resumes, when you submit it again, from the newest of the checkpoints saved
# every checkpoint_every steps. For long runs use submit_pm.sh, which checkpoints and requeues itself.
#   sbatch -A <account> [--reservation=<name>] stages/07_large_batch/submit_pm_torchrun.sh --config default
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/07_large_batch/submit_pm_torchrun.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# The rendezvous: the job's first node, on a port derived from the job id (two jobs on a node do not collide).
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=$((15000 + SLURM_JOB_ID % 15000))
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-4}

echo "$(date +%T) job $SLURM_JOB_ID, $SLURM_JOB_NUM_NODES node(s), rendezvous $RDZV_HOST:$RDZV_PORT"
srun "${TUTORIAL_PYTHON[@]}" -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID" \
  stages/07_large_batch/train.py "$@"
