# shellcheck shell=bash
# Sourced by every submit script (from the repository root): prepares Python for the job and sets
# TUTORIAL_PYTHON, an array holding the command that runs Python in that environment.
#
#   TUTORIAL_ENV=module   Perlmutter's PyTorch module: module load ${PYTORCH_MODULE:-pytorch}
#                         (the default when $NERSC_HOST is perlmutter)
#   TUTORIAL_ENV=podman   the container ${TUTORIAL_IMAGE} through podman-hpc (see docker/README.md)
#   TUTORIAL_ENV=shifter  the container ${TUTORIAL_IMAGE} through shifter
#   TUTORIAL_ENV=venv     the virtual environment ${TUTORIAL_VENV:-.venv}
#                         (the default elsewhere when .venv exists)
#   TUTORIAL_ENV=none     whatever python3 is on PATH (the default otherwise)

if [[ -z "${TUTORIAL_ENV:-}" ]]; then
  if [[ "${NERSC_HOST:-}" == perlmutter ]]; then
    TUTORIAL_ENV=module
  elif [[ -f "${TUTORIAL_VENV:-.venv}/bin/activate" ]]; then
    TUTORIAL_ENV=venv
  else
    TUTORIAL_ENV=none
  fi
fi

case "$TUTORIAL_ENV" in
  module)
    module load "${PYTORCH_MODULE:-pytorch}"
    TUTORIAL_PYTHON=(python)
    ;;
  podman)
    : "${TUTORIAL_IMAGE:?set TUTORIAL_IMAGE to the image you built, see docker/README.md}"
    # Multi-node NCCL from a container (NERSC's container docs): the host's NCCL network plugin (--nccl), and
    # libfabric's memory-registration cache watched by userfaultfd.
    export FI_MR_CACHE_MONITOR=userfaultfd
    # Pass Slurm's and the tutorial's variables into the container, and mount the repo and $SCRATCH.
    TUTORIAL_PYTHON=(podman-hpc run --rm --gpu --nccl --ipc=host --network=host
      -e 'SLURM_*' -e 'MASTER_*' -e 'TUTORIAL_*' -e OMP_NUM_THREADS -e FI_MR_CACHE_MONITOR -e SCRATCH -v "$PWD:$PWD" -w "$PWD")
    if [[ -n "${SCRATCH:-}" ]]; then
      TUTORIAL_PYTHON+=(-v "$SCRATCH:$SCRATCH")
    fi
    TUTORIAL_PYTHON+=("$TUTORIAL_IMAGE" python)
    ;;
  shifter)
    : "${TUTORIAL_IMAGE:?set TUTORIAL_IMAGE to the image you pulled, see docker/README.md}"
    export FI_MR_CACHE_MONITOR=userfaultfd  # as for podman above; shifter's nccl-plugin module brings the plugin
    TUTORIAL_PYTHON=(shifter --image="$TUTORIAL_IMAGE" "--module=gpu,nccl-plugin" python)
    ;;
  venv)
    # shellcheck disable=SC1091  # the venv is made by the user, not part of the repository
    source "${TUTORIAL_VENV:-.venv}/bin/activate"
    TUTORIAL_PYTHON=(python)
    ;;
  none)
    TUTORIAL_PYTHON=(python3)
    ;;
  *)
    echo "error: TUTORIAL_ENV=$TUTORIAL_ENV is not one of module, podman, shifter, venv, none" >&2
    exit 1
    ;;
esac

# Slurm 22.05 to 23.02: srun ignores the job's --cpus-per-task (SLURM_CPUS_PER_TASK) and reads only
# SRUN_CPUS_PER_TASK, so each task would get one CPU. Slurm 23.11 reverted that: srun reads
# SLURM_CPUS_PER_TASK again (SchedMD's CHANGELOG for 22.05 and 23.11). Setting SRUN_CPUS_PER_TASK gives the
# same result on either, so this line does not depend on the version a cluster runs.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi
export PYTHONUNBUFFERED=1  # log lines reach the Slurm output file as they are printed
echo "environment: TUTORIAL_ENV=$TUTORIAL_ENV, python: ${TUTORIAL_PYTHON[*]}"
