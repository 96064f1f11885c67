"""The loader alone, with no model: how many samples per second can it deliver, and what memory does it cost?

It builds stage 04's training loader (the same sampler, augmentation and settings) for each number of workers,
reads `--batches` batches after `--warmup`, and measures the memory of the main process and its workers
together as PSS (proportional set size): a page that k processes share counts 1/k in each, so the
memory-mapped data, which all workers share through the page cache, counts once.

    python stages/04_data_loading/bench_loader.py --data_preset small
    python stages/04_data_loading/bench_loader.py --data_preset full --batch_size 128 --workers 0 2 4 8 16
"""

import argparse
import functools
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common
from data_loading import EpochSampler, start_worker  # the stage's own loader pieces


def pss_mib(pids):
    """The memory of these processes together, in MiB, with shared pages split among those that share them."""
    kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                kib += int(line.split()[1])
    return kib / 1024


def endless_batches(loader, sampler):
    """Batches epoch after epoch, so that a short data set can feed a long measurement."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(train_set, workers, args):
    """samples/s of the loader alone, and the memory (PSS, MiB) of this process and its workers."""
    sampler = EpochSampler(len(train_set), args.batch_size, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                        prefetch_factor=args.prefetch_factor if workers else None,
                        worker_init_fn=functools.partial(start_worker, os.getpid()))  # fmt: skip
    batches = endless_batches(loader, sampler)
    for _ in range(args.warmup):  # workers start and fill their queues
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    samples_per_s = args.batches * args.batch_size / (time.perf_counter() - start)
    memory = pss_mib([os.getpid()] + [child.pid for child in multiprocessing.active_children()])
    batches.close()  # ends the workers
    return samples_per_s, memory


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data_preset", default="small", choices=common.PRESETS)
    parser.add_argument("--data_root", help="default: $SCRATCH/<repo>/data or data/generated")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prefetch_factor", type=int, default=4)
    parser.add_argument("--batches", type=int, default=100, help="batches timed (default: 100)")
    parser.add_argument("--warmup", type=int, default=10, help="batches read before timing (default: 10)")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        raise common.UserError("this benchmark reads /proc/<pid>/smaps_rollup, which only Linux has")

    data_dir = common.ensure_data(args.data_preset, args.data_root)
    train_set = common.FieldDataset(data_dir, "train", augment=True)
    data_mib = (data_dir / "train.npy").stat().st_size / 2**20
    cpus = len(os.sched_getaffinity(0))
    print(f"preset {args.data_preset!r} (train.npy: {data_mib:.0f} MiB), batch {args.batch_size}, {cpus} CPUs "
          f"for this process, {common.hardware(common.choose_device())}")  # fmt: skip
    print(f"{'workers':>7}  {'samples/s':>9}  {'memory (PSS, MiB)':>17}")
    for workers in args.workers:
        samples_per_s, memory = measure(train_set, workers, args)
        print(f"{workers:>7}  {samples_per_s:>9.0f}  {memory:>17.0f}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
