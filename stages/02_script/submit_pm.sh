#!/bin/bash
#SBATCH --job-name=02_script       # the name squeue shows
#SBATCH --constraint=gpu           # Perlmutter: a GPU node (4 A100s)
#SBATCH --qos=regular              # or debug (at most 30 min, starts sooner)
#SBATCH --nodes=1                  # one node
#SBATCH --ntasks-per-node=1        # one training process
#SBATCH --gpus-per-node=1          # this stage uses one GPU
#SBATCH --cpus-per-task=32         # a quarter of the node's CPU cores, for this process
#SBATCH --time=00:30:00            # wall-clock limit: the job is killed after this
#SBATCH --output=slurm-%x-%j.out   # the log, in the folder you submitted from: slurm-<name>-<job id>.out
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
