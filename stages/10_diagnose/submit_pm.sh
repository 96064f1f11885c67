#!/bin/bash
#SBATCH --job-name=10_diagnose          # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=regular              # whole nodes (or --qos=debug: up to 30 min, a short wait, for trying things)
#SBATCH --nodes=1                  # one node; `sbatch -N 2 ...` asks for two, and every line below is per node
#SBATCH --ntasks-per-node=4        # one training process per GPU
#SBATCH --gpus-per-node=4          # all 4 GPUs; every process sees all 4 and takes the one of its local rank
#SBATCH --cpus-per-task=32         # the node's 128 CPU threads shared by the 4 processes, for their data workers
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#SBATCH --signal=B:USR1@120        # USR1 to this batch shell 120 s before the time limit
#SBATCH --requeue                  # this job may be put back in the queue (by itself, below)
#SBATCH --open-mode=append         # a requeued run appends to the same log instead of overwriting it
#
# These are the settings of NERSC's own multi-GPU examples (docs.nersc.gov, "Machine learning", "Launchers"):
# one task per GPU, 32 CPU threads per task, and the processes meet at the first node of the job.
#
# Submit from the repository root, naming your account (and reservation, if any) on the command line;
# anything after the script name goes to train.py:
#   sbatch -A <account> [--reservation=<name>] stages/10_diagnose/submit_pm.sh --config default
#   sbatch -A <account> -N 2 stages/10_diagnose/submit_pm.sh --config full     # 8 GPUs on 2 nodes
set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so find the repository where you submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/10_diagnose/submit_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# Where the processes meet: rank 0's node (the job's first, never the login node you submitted from) and a
# port derived from the job id, so that two jobs on one node do not collide. distributed.py computes the same
# when these are not set; setting them here lets them reach a container, which may have no scontrol.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
# One CPU thread per process, as torchrun sets: the GPU computes, and the data workers are processes of their own.
export OMP_NUM_THREADS=1
# Each process next to its GPU. A Perlmutter GPU node's 64 cores form 4 NUMA domains of 16, and GPU 3 is attached
# to the first, GPU 0 to the last (NERSC's multi-GPU examples reverse the GPU order for this: NERSC/sc23-dl-tutorial
# submit_pm_dp.sh). srun binds task r to the cores of domain r (--cpu-bind=cores, below), and TUTORIAL_GPU_ORDER makes
# the process of local rank r take GPU 3-r (distributed.py); each process prints its GPU and CPUs. (Slurm sets
# CUDA_VISIBLE_DEVICES again for every srun step, so NERSC's export of it does not reach the tasks. Written from
# NERSC's documentation; not run on Perlmutter.)
export TUTORIAL_GPU_ORDER=3,2,1,0

# Near the time limit: let train.py checkpoint at its next step, then put this job back in the queue.
# The requeued job runs this script again, and train.py resumes from the newest checkpoint. If train.py has not
# stopped STOP_GRACE_S later, a rank hangs and the others wait for it in a collective, past the time limit: ask
# every rank for its stacks, then requeue anyway, from the last checkpoint written; but not after a third hang in
# this job's log (it appends across requeues), which would only hang again.
STOP_GRACE_S=${TUTORIAL_STOP_GRACE_S:-90}  # of the 120 s that --signal gives (above)
checkpoint_and_requeue() {
  echo "$(date +%T) USR1: the time limit is near; train.py checkpoints and stops"
  kill -USR1 "$train_pid"  # srun passes the signal on to every process; they agree on the step to stop at
  local waited=0
  while kill -0 "$train_pid" 2>/dev/null && ((waited < STOP_GRACE_S)); do
    sleep 1
    waited=$((waited + 1))
  done
  if kill -0 "$train_pid" 2>/dev/null; then
    echo "$(date +%T) train.py did not stop within $STOP_GRACE_S s: a rank hangs (or log_every steps take longer" \
      "than that). Each rank writes its stacks to <out_dir>/stacks/rank<r>.txt"
    scancel --signal=USR2 "$SLURM_JOB_ID" || true  # to srun's processes (not to this shell: no --batch, no --full)
    sleep 5
    local hangs
    hangs=$(grep -c "did not stop within" "slurm-$SLURM_JOB_NAME-$SLURM_JOB_ID.out" 2>/dev/null || true)
    if ((${hangs:-0} >= 3)); then
      echo "$(date +%T) the third hang of this job: not requeueing it; find the hang in the stacks first"
      exit 1  # ends the job, and the processes of its steps with it
    fi
    echo "$(date +%T) requeueing job $SLURM_JOB_ID, to resume from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"  # ends this run's processes, the hung one too, and queues the job again
    exit 3
  fi
  local code=0
  wait_for_train || code=$?
  if [[ $code -eq 3 ]]; then  # 3: stopped early, with a checkpoint to resume from
    echo "$(date +%T) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$code"  # 0 if training had finished anyway (the signal came during its last moments): no requeue
}
trap checkpoint_and_requeue USR1
# USR2 asks for every rank's stacks (train.py writes them to <out_dir>/stacks/rank<r>.txt, and goes on):
# `scancel --signal=USR2 <job>` sends it to srun's processes; with --full, to this shell too, which must survive it.
trap 'echo "$(date +%T) USR2: every rank writes its stacks to <out_dir>/stacks/"' USR2

# srun's exit code, once it has ended: a trapped USR2 ends `wait` early, and then it waits again.
wait_for_train() {
  local code
  until wait "$train_pid"; do
    code=$?
    kill -0 "$train_pid" 2>/dev/null || return "$code"
  done
}

echo "$(date +%T) job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, $SLURM_NTASKS processes, master $MASTER_ADDR:$MASTER_PORT"
# srun starts one process per task (4 per node); they find their rank in SLURM_PROCID. srun runs in the
# background and the shell waits for it: a trap runs only once `wait` is interrupted. When one process ends, srun
# ends the others 30 s later (--wait=30: a dead rank ends the job); --kill-on-bad-exit=0 keeps it from killing them at
# once, mid-save, when the first one exits with the 3 of a time-limit stop (whatever the cluster's KillOnBadExit).
srun --wait=30 --kill-on-bad-exit=0 --cpu-bind=cores "${TUTORIAL_PYTHON[@]}" stages/10_diagnose/train.py "$@" &
train_pid=$!
wait_for_train
