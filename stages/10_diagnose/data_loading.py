"""How batches reach train.py: worker processes that prepare the next ones while the GPU trains (stage 04's
concept), a sampler that gives a resumed run the batches the interrupted one would have seen, and the loaders.

Later stages copy this file; stage 06 gives each process its share of every batch, and stage 07 cuts that share
into micro-batches.
"""

import functools
import logging
import multiprocessing
import os
import signal
import traceback

import torch
from torch.utils.data import DataLoader

import common

log = logging.getLogger(__name__)


class EpochSampler(torch.utils.data.Sampler):
    """The samples of an epoch, in an order that depends on (seed, epoch) only, from first_batch on: a resumed
    run sees exactly the batches the interrupted one would have seen. It yields (epoch, index) pairs, so
    that the epoch reaches the DataLoader workers, whose copies of the Dataset never see set_epoch.
    Every rank draws the same order and takes its own slice of each batch of batch_size samples (the global
    batch): together the ranks see the batches one process would see, whatever their number."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.local_batch = rank, batch_size // world_size
        self.epoch, self.first_batch = 0, 0

    def set_epoch(self, epoch, first_batch=0):
        self.epoch, self.first_batch = epoch, first_batch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        mine = []
        for batch in range(self.first_batch, self.size // self.batch_size):
            start = batch * self.batch_size + self.rank * self.local_batch
            mine += order[start : start + self.local_batch].tolist()
        return iter([(self.epoch, index) for index in mine])

    def __len__(self):
        return (self.size // self.batch_size - self.first_batch) * self.local_batch


def worker_count(num_workers):
    """-1 (auto): one worker per CPU this process may use (on Slurm, --cpus-per-task), less one for the
    training loop, and at most 8 (bench_loader.py shows where more stops helping); else the number given, up to
    4 per CPU. Each worker is a process with memory of its own: --num_workers 1000 started 1300 processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if num_workers == -1:
        return min(8, cpus - 1)
    if num_workers > 4 * cpus:
        raise common.UserError(f"--num_workers {num_workers}: this process may use {cpus} CPU(s), and more than "
                               f"{4 * cpus} workers (4 per CPU) only compete for them, each with memory of its own: "
                               "choose fewer, or -1 for one per CPU")  # fmt: skip
    return num_workers


def start_worker(parent_pid, worker_id):
    """In each worker: leave Ctrl-C and Slurm's signals to the main process, which saves and stops the run.
    (A terminal sends Ctrl-C to every process of the program, and Slurm may signal every process of a step.)
    A worker whose main process died while starting it ends at once: PyTorch's check that the main process is
    alive would miss that death, and the worker would wait for ever (holding copies of the dead process's
    connections to the other DDP processes, which would then not notice that it died)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # USR2: the stacks of the rank
        signal.signal(signum, signal.SIG_IGN)
    if os.getppid() != parent_pid:
        os._exit(1)


def check_global_batch(cfg, world_size):
    """The processes share each batch: each takes global_batch_size / world_size samples of it."""
    if cfg.global_batch_size % world_size:
        raise common.UserError(f"--global_batch_size {cfg.global_batch_size} is shared by {world_size} processes: "
                               f"choose a multiple of {world_size}")  # fmt: skip


def make_loaders(cfg, data_dir, device, micro_batch, rank=0, world_size=1):
    """The training loader is made once: its worker processes live as long as the run (persistent_workers).
    Each rank loads its share of every batch, one micro-batch at a time, and validates every world_size-th sample."""
    train_set = common.FieldDataset(data_dir, "train", augment=True, seed=cfg.seed)
    val_set = common.FieldDataset(data_dir, "val")
    check_global_batch(cfg, world_size)
    if len(train_set) < cfg.global_batch_size:
        raise common.UserError(f"--global_batch_size {cfg.global_batch_size} exceeds the {len(train_set)} training "
                               f"samples of preset {cfg.data_preset!r}: choose a smaller one")  # fmt: skip
    common.check_depth(cfg.depth, train_set.meta["grid"])
    workers = worker_count(cfg.num_workers)
    pin = cfg.pin_memory and device.type == "cuda"  # page-locked host memory: faster, asynchronous copies to a GPU
    sampler = EpochSampler(len(train_set), cfg.global_batch_size, cfg.seed, rank, world_size)
    persistent = cfg.persistent_workers and workers > 0
    worker_start = functools.partial(start_worker, os.getpid())  # each worker is told its parent
    prefetch = cfg.prefetch_factor if workers > 0 else None  # batches each worker prepares ahead
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, drop_last=True,
                              num_workers=workers, pin_memory=pin, persistent_workers=persistent,
                              prefetch_factor=prefetch, worker_init_fn=worker_start)  # fmt: skip
    # Validation reads in this process, without workers: its samples need no augmentation, and a worker forked at
    # every validation, from a process whose other threads (TensorBoard's writer, gloo's, W&B's) may hold a lock at
    # that moment, inherits the lock without the thread that would release it, and waits for ever. (Seen twice in the
    # test suite on 2 busy cores: runs of 2 and 4 processes stuck at an epoch's end before its validation line, a
    # rank timing out in an all-reduce; BigScience met it too, and read validation without workers.)
    val_loader = DataLoader(val_set, batch_size=micro_batch, sampler=range(rank, len(val_set), world_size),
                            pin_memory=pin)  # fmt: skip
    log.info(f"data loading: {workers} worker processes, pin_memory {pin}, prefetch_factor {cfg.prefetch_factor}")
    return train_set, sampler, train_loader, val_loader


def known_failure(error):
    """One line for a DataLoader worker process that died (killed, often for want of memory), or None. PyTorch says
    so itself, or the main process finds the connection to the dead worker reset while it receives a batch."""
    text = str(error).strip()
    said = isinstance(error, RuntimeError) and text.startswith("DataLoader worker")
    frames = traceback.extract_tb(error.__traceback__)
    receiving = isinstance(error, ConnectionError | EOFError) and any("utils/data" in f.filename for f in frames)
    if not (said or receiving):
        return None
    what = text.splitlines()[0].rstrip(". ") if said else f"{type(error).__name__} while receiving a batch"
    return (f"{what}: a DataLoader worker process ended before training did (killed, often for want of memory: "
            "try fewer --num_workers); the checkpoints are intact: run the same command to resume")  # fmt: skip


def end_workers():
    """When the run ends, for whatever reason: end this process's DataLoader workers at once. After an error, the
    loader may not have stopped them; multiprocessing's exit would then send them SIGTERM, which they ignore (see
    start_worker), and wait for them for ever (seen after a worker was killed on a busy machine)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would raise again for the workers ended here
    for worker in multiprocessing.active_children():
        worker.kill()
