#!/bin/bash
#SBATCH --job-name=10_diagnose_torchrun # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=regular              # whole nodes (or --qos=debug: up to 30 min, for trying things)
#SBATCH --nodes=1                  # one node; `sbatch -N 2 ...` asks for two
#SBATCH --ntasks-per-node=1        # one task per node: torchrun, which starts the 4 training processes itself
#SBATCH --gpus-per-node=4          # all 4 GPUs, for torchrun's 4 processes
#SBATCH --cpus-per-task=128        # all 128 CPU threads of the node, shared by the 4 processes and their workers
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# The same training as submit_pm.sh, launched by torchrun instead of srun: srun starts one torchrun per node,
# and the torchruns meet (a c10d rendezvous) on the job's first node, then each starts one process per GPU.
#   sbatch -A <account> [--reservation=<name>] stages/10_diagnose/submit_pm_torchrun.sh --config default
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/10_diagnose/submit_pm_torchrun.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# The rendezvous: the job's first node, on a port derived from the job id (two jobs on a node do not collide).
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=$((15000 + SLURM_JOB_ID % 15000))
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-4}  # what --gpus-per-node asked for (a count, or type:count)
GPUS_PER_NODE=${GPUS_PER_NODE##*:}
torchrun=("${TUTORIAL_PYTHON[@]}" -m torch.distributed.run --nnodes "$SLURM_JOB_NUM_NODES"
  --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID")
torchrun_options=$("${TUTORIAL_PYTHON[@]}" -m torch.distributed.run --help)

# Each process next to its GPU: torchrun binds the process of local rank r to the cores of GPU r's NUMA domain
# (--numa-binding, PyTorch 2.9 and newer, with numactl; it reads where the GPUs are, so only where there are GPUs).
if [[ $torchrun_options == *--numa-binding* ]] && command -v nvidia-smi > /dev/null; then
  torchrun+=(--numa-binding=node)
fi

# Near the time limit: torchrun passes USR1 on to its processes only when asked to (--signals-to-handle, PyTorch 2.9
# and newer), and they checkpoint and stop as under srun. torchrun then exits with its own code (1), not theirs (3),
# after stopping any process not done within its --shutdown-timeout (30 s): so here any exit code but 0 after the
# signal means "not finished", and the job requeues to resume from the newest checkpoint.
checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; torchrun passes it on, and train.py checkpoints and stops"
  kill -USR1 "$train_pid"  # srun passes the signal on to torchrun
  local code=0
  wait "$train_pid" || code=$?
  if [[ $code -ne 0 ]]; then
    echo "$(date +%T) requeueing job $SLURM_JOB_ID (torchrun's exit code: $code)"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"
}
if [[ $torchrun_options == *--signals-to-handle* ]]; then
  torchrun+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")  # torchrun's own four, and USR1
  trap checkpoint_and_requeue USR1
else
  echo "this torchrun cannot pass USR1 on: the time limit ends the job; submit it again to resume from a checkpoint"
fi

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $SLURM_JOB_NUM_NODES node(s), rendezvous $RDZV_HOST:$RDZV_PORT"
# --wait=30, --kill-on-bad-exit=0: as in submit_pm.sh. In the background, so that the trap can run.
srun --wait=30 --kill-on-bad-exit=0 "${torchrun[@]}" stages/10_diagnose/train.py "$@" &
train_pid=$!
wait "$train_pid"
