"""Which process am I (its rank), where are the others, and the collectives train.py calls: the distributed plumbing.
Each function that holds a collective says so in the first line of its docstring: every rank must call it, at the
same point of the run, or the ranks that did wait for the others until ddp_timeout_s.

A process learns its place from the launcher that started it:

- torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT itself;
- srun sets SLURM_PROCID (the rank), SLURM_LOCALID (the rank on this node) and SLURM_NTASKS (the world
  size); MASTER_ADDR and MASTER_PORT are then derived here: the first node of the job step, and a port derived from
  the job id, so that two jobs that share a node do not collide. Doing it here, rather than in a batch
  script, makes any srun work: from sbatch, from salloc, or typed by hand;
- neither (python train.py): one process and no process group, exactly as stage 05.

Later stages copy this file unchanged. (How each process takes its share of every batch is in data_loading.py.)
"""

import datetime
import hashlib
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

import common

log = logging.getLogger(__name__)


def ranks_from_launcher():
    """(rank, local rank, world size, launcher) of this process; launcher is None when there is none."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun"
    # SLURM_STEP_ID: a task of srun. (The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS of the
    # whole job, so those alone would make a `python train.py` typed in it wait for ranks that never come.)
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]), "srun"
    return 0, 0, 1, None


def master_addr_from_slurm():
    """MASTER_ADDR: the first node of this job step (where rank 0 runs), never the login node you submitted
    from. MASTER_PORT: 15000 to 29999, from the job id (below the ports Linux hands out to connections)."""
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ["SLURM_JOB_NODELIST"]
        try:
            hostnames = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                       check=True).stdout.split()  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as error:  # e.g. in a container without Slurm's tools
            raise common.UserError(f"cannot name the first node of {nodes} ({error}): export MASTER_ADDR=<it> "
                                   "before srun, as stages/07_large_batch/submit_pm.sh does") from None  # fmt: skip
        os.environ["MASTER_ADDR"] = hostnames[0]
    os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ["SLURM_JOB_ID"]) % 15000))


def ensure_data_once(preset, data_root, rank):
    """Rank 0 generates missing data while the others wait for its folder (written whole, then renamed). No rank
    is in a collective meanwhile (they wait on the file system), so a long generation cannot run into a
    collective's timeout."""
    folder = common.data_dir_for(preset, data_root)
    if rank != 0 and not folder.exists():
        log.warning(f"waiting for rank 0 to generate {folder}")
        while not folder.exists():
            time.sleep(1)
    return common.ensure_data(preset, data_root)


def device_for(name, local_rank):
    """Each process on a node takes its own GPU (gpu_index); on a CPU every process uses the CPU. Each prints
    where it runs: its rank, its GPU and the CPUs it may use, so that a job's log shows every GPU in use."""
    device = common.choose_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    gpu = f"GPU {device.index} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "the CPU"
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(f"rank {ranks_from_launcher()[0]} (local rank {local_rank}) on {socket.gethostname()}: {gpu}, CPUs "
          f"{cpu_ranges(cpus)}", flush=True)  # fmt: skip
    return device


def gpu_index(local_rank, gpu_count):
    """The CUDA device of the process with this local rank: its local rank, counted in TUTORIAL_GPU_ORDER when the
    job script sets it. On a Perlmutter GPU node, GPU 3 is nearest the first 16 cores, where srun places rank 0, and
    GPU 0 the last 16: submit_pm.sh sets 3,2,1,0, as NERSC's examples reverse CUDA_VISIBLE_DEVICES. (Slurm sets
    CUDA_VISIBLE_DEVICES again for every srun step, so that is not where the order can go.)"""
    text = os.environ.get("TUTORIAL_GPU_ORDER", "")
    order = [int(index) for index in text.split(",") if index.strip().isdigit()] if text else list(range(gpu_count))
    if sorted(order) != list(range(gpu_count)):
        raise common.UserError(f"TUTORIAL_GPU_ORDER={text} does not list each of the {gpu_count} GPUs this process "
                               f"sees once: list 0 to {gpu_count - 1} in any order, or unset it")  # fmt: skip
    return order[local_rank % gpu_count]


def cpu_ranges(cpus):
    """[0, 1, 2, 3, 8, 9] -> '0-3,8-9'"""
    ranges = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{first}-{last}" if last > first else f"{first}" for first, last in ranges) or "?"


def setup_logging(out_dir, stage, rank):
    """Rank 0 logs to the terminal and to out_dir/train.log; the other ranks print only warnings and errors, each
    line naming its rank, and write no log file."""
    if rank == 0:
        common.setup_logging(out_dir, stage)
    else:
        logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s", force=True)


def init_process_group(launcher, rank, world_size, device, timeout_s):
    """Every rank calls this: join the process group (NCCL between GPUs, gloo between CPU processes). A collective
    that waits longer than timeout_s for a rank (one that died or hangs) fails, and the job ends instead of waiting
    for ever."""
    if launcher is None:
        return
    if launcher == "srun":
        master_addr_from_slurm()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def destroy_process_group():
    """Every rank calls this at the end of a run that did not fail (with a rank gone, it could wait for ever)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(*values):
    """Every rank calls this (an all-reduce): numbers (floats, or one-element tensors such as a loss) averaged over
    the ranks, in one collective, as Python floats. In one process: the numbers themselves."""
    device = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"  # NCCL reduces on GPUs
    together = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=device).reshape(()) for value in values])
    if dist.is_initialized():
        dist.all_reduce(together)
        together /= dist.get_world_size()
    return together.tolist()  # waits for the GPU, and for the other ranks


def barrier():
    """Every rank calls this: each waits here until all have arrived."""
    if dist.is_initialized():
        dist.barrier()


def check_same_on_every_rank(facts):
    """Every rank calls this (an all-gather): refuse to train when processes differ in what defines the run
    (settings, data set, the checkpoint they resumed from, the code). Different commands per rank, or a node with
    another copy of the code, would otherwise train a model that none of them meant."""
    if not dist.is_initialized():
        return
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {**facts, "code": code_fingerprint()})
    for rank, theirs in enumerate(everyone):
        different = [f"{key} {theirs.get(key)!r} there, {value!r} on rank 0"
                     for key, value in everyone[0].items() if theirs.get(key) != value]  # fmt: skip
        if different:
            raise common.UserError(f"rank {rank} would train another run than rank 0 ({'; '.join(different)}): "
                                   "start every process with the same command, data and code")  # fmt: skip


def code_fingerprint():
    """This process's code, in 12 hex digits: a hash of its stage's .py files and of the common module's. A node
    that runs another copy of the repository (an older checkout, a container with other files) differs in it."""
    digest = hashlib.sha256()
    stage = Path(__file__).resolve().parent
    for path in sorted([*stage.glob("*.py"), *(stage.parent / "common").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def known_failure(error):
    """One line for a collective that failed because another process died or stopped answering (gloo: a connection
    reset or closed by the other side, or a timeout; NCCL: a DistBackendError), for rank 0's port taken, or None."""
    text = str(error).strip()
    if "EADDRINUSE" in text:  # rank 0 could not listen for the others: another program (another job?) has the port
        return (f"rank 0 cannot listen on port {os.environ.get('MASTER_PORT')} of {os.environ.get('MASTER_ADDR')}: "
                "another program uses it (another job's rank 0 on this node?); export MASTER_PORT=<another port, "
                "15000-29999> and start again")  # fmt: skip
    signs = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out", "Socket Timeout")
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in text for s in signs))):
        return None
    reason = text.splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # gloo: "[file:line] Read error ...: Connection"
    return (f"another process of this run died or stopped answering ({reason}); the first error in the job's log says "
            "why. The checkpoints are intact: run the same command to resume")  # fmt: skip
