"""A rank that skips a collective: the one failure of the clinic that no one can cause from outside a running
train.py. Rank 1 leaves out one all-reduce at step 2, as an `if rank == 0:` around a collective would.

    torchrun --standalone --nproc_per_node 2 stages/10_diagnose/skipped_collective.py
    TORCH_DISTRIBUTED_DEBUG=DETAIL torchrun --standalone --nproc_per_node 2 stages/10_diagnose/skipped_collective.py

Without TORCH_DISTRIBUTED_DEBUG, each rank's next collective meets the other's wrong one: gloo sees the sizes
differ or waits until the timeout (10 s here), and nothing says which line is wrong. With DETAIL, PyTorch compares
every collective's kind and shapes across the ranks before running it, and names the mismatch at once.
"""

import datetime

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))
rank = dist.get_rank()
gradients, loss = torch.ones(1000), torch.ones(1)
for step in (1, 2, 3):
    dist.all_reduce(gradients)
    if not (rank == 1 and step == 2):  # the bug: rank 1 does not agree on the loss at step 2
        dist.all_reduce(loss)
    print(f"rank {rank}: step {step} done", flush=True)
dist.destroy_process_group()
