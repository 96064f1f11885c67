"""An exception on one rank: rank 1 raises at step 3 while rank 0 goes on to its next all-reduce, then fails too,
its collective's connection closed. Two tracebacks; the cause is the first in time, which torchrun's summary names
("Root Cause (first observed failure)") with its traceback, thanks to @record.

    torchrun --standalone --nproc_per_node 2 stages/10_diagnose/exception_on_one_rank.py
"""

import datetime
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record


@record  # writes this process's exception where torchrun reads it, for its summary of the failure
def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    for step in (1, 2, 3, 4):
        if rank == 1 and step == 3:
            raise ValueError("rank 1: a sample it cannot read (say)")
        dist.all_reduce(torch.ones(10))
        print(f"rank {rank}: step {step} done", flush=True)
        time.sleep(0.5)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
