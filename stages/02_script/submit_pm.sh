#!/bin/bash
#SBATCH --job-name=02_script       # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: a GPU node (4 A100s)
#SBATCH --qos=shared               # a share of a node, not the whole node: see "Why shared" below
#SBATCH --nodes=1                  # one node
#SBATCH --ntasks=1                 # one training process
#SBATCH --gpus-per-task=1          # one of the node's 4 GPUs
#SBATCH --cpus-per-task=32         # 32 of the node's 128 CPU threads: a quarter, like the one GPU of four
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
#
# Why shared: a job on the `regular` QOS gets, and is charged for, a whole node with 4 GPUs; this stage uses
# one. The `shared` QOS gives it a quarter of a node (1 GPU, 32 CPU threads), as NERSC's own one-GPU examples
# do. NERSC's QOS and charging pages give the current rules (https://docs.nersc.gov/jobs/policy/).
#
# Submit from the repository root, naming your account (and reservation, if any) on the command line;
# anything after the script name goes to train.py:
#   sbatch -A <account> [--reservation=<name>] stages/02_script/submit_pm.sh --config default
set -euo pipefail

# sbatch runs a copy of this script from a spool folder, so find the repository where you submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
if [[ ! -f slurm/setup_env.sh ]]; then
  echo "error: submit from the repository root: cd <repo> && sbatch stages/02_script/submit_pm.sh" >&2
  exit 1
fi
source slurm/setup_env.sh

srun "${TUTORIAL_PYTHON[@]}" stages/02_script/train.py "$@"
