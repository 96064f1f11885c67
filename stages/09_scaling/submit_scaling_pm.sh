#!/bin/bash
#SBATCH --job-name=09_scaling      # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: GPU nodes (4 A100s each)
#SBATCH --qos=debug                # short measurements: the debug QOS (up to 30 min) starts soonest
#SBATCH --nodes=1                  # one node; `sbatch -N 2 ...` and `-N 4 ...` for the other points
#SBATCH --ntasks-per-node=4        # one process per GPU
#SBATCH --gpus-per-node=4          # all 4 GPUs; every process sees all 4 and takes the one of its local rank
#SBATCH --cpus-per-task=32         # the node's 128 CPU threads shared by the 4 processes, for their data workers
#SBATCH --time=00:15:00            # the all-reduce benchmark and one short epoch: a few minutes
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#
# Will it scale? On 1, 2 and 4 nodes: measure the all-reduce (bench_allreduce.py), then profile steps 21-25 of
# training (train.py --profile_steps); scaling_model.py then compares them with its prediction. Written from
# NERSC's and NVIDIA's documentation; not run on Perlmutter (no Perlmutter allocation was used for this tutorial).
#
# Submit from the repository root, once per node count; anything after the script name goes to train.py:
#   sbatch -A <account> stages/09_scaling/submit_scaling_pm.sh
#   sbatch -A <account> -N 2 stages/09_scaling/submit_scaling_pm.sh
#   sbatch -A <account> -N 4 stages/09_scaling/submit_scaling_pm.sh --global_batch_size 1024 --data_preset full
#   TUTORIAL_NSYS=1 sbatch -A <account> stages/09_scaling/submit_scaling_pm.sh    # and an Nsight Systems timeline
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/09_scaling/submit_scaling_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

# Where the processes meet, one thread per process, each process next to its GPU: as in submit_pm.sh.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
export OMP_NUM_THREADS=1
export TUTORIAL_GPU_ORDER=3,2,1,0
# NCCL says which network it uses as it starts: lines with "NET/OFI" mean the libfabric plugin (aws-ofi-nccl) drives
# Slingshot; "NET/Socket" means the fallback to TCP sockets, 2 to 3 times slower for communication-bound work
# (ALCF's measurements on Polaris, also Slingshot). INIT,NET keeps NCCL to those lines.
export NCCL_DEBUG=INFO
export NCCL_DEBUG_SUBSYS=INIT,NET

# Outputs where the stages put theirs: $SCRATCH/<repository>/runs/... on Perlmutter, else runs/ in the repository.
runs="runs"
if [[ -n "${SCRATCH:-}" ]]; then
  runs="$SCRATCH/$(basename "$PWD")/runs"
fi
folder="$runs/09_scaling/scaling-${SLURM_JOB_NUM_NODES}node-${SLURM_JOB_ID}"
mkdir -p "$folder"
echo "$(date +%T) job $SLURM_JOB_ID: $SLURM_NTASKS processes on $SLURM_JOB_NUM_NODES node(s); results in $folder"

# The message sizes of bench_allreduce.py (4 KB to 256 MB), or fewer for a quick try: TUTORIAL_BENCH_SIZES=4KB,1MB
sizes=()
if [[ -n "${TUTORIAL_BENCH_SIZES:-}" ]]; then
  sizes=(--sizes "$TUTORIAL_BENCH_SIZES")
fi
srun --cpu-bind=cores "${TUTORIAL_PYTHON[@]}" stages/09_scaling/bench_allreduce.py "${sizes[@]}" --out "$folder/allreduce.json"

# Nsight Systems, if asked: a timeline per rank with the CUDA kernels and the NVTX ranges train.py names (data
# wait, forward, backward, optimizer). Open the .nsys-rep files in Nsight Systems on your own computer. (With the
# PyTorch module: nsys starts Python itself. In a container, nsys must be inside it.)
profiler=()
if [[ "${TUTORIAL_NSYS:-0}" == 1 ]]; then
  profiler=(nsys profile "--trace=cuda,nvtx" --output="$folder/nsys-rank%q{SLURM_PROCID}")
fi
# One epoch of `default` (64 steps of the global batch 64), steps 21-25 profiled.
srun --wait=30 --cpu-bind=cores "${profiler[@]}" "${TUTORIAL_PYTHON[@]}" stages/09_scaling/train.py \
  --config default --num_epochs 1 --profile_steps 21-25 --out_dir "$folder/train" "$@"
echo "$(date +%T) the breakdown: $folder/train/profile/breakdown.json; predict with:"
echo "  python stages/09_scaling/scaling_model.py --profile <1-node job>/train/profile/breakdown.json --allreduce $folder/allreduce.json"
