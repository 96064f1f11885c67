"""Hello, all-reduce: each process holds one number, and after all_reduce every process holds their sum.
This is the one operation DistributedDataParallel is built on: it sums (and averages) the gradients.

    torchrun --standalone --nproc_per_node 2 stages/06_ddp/hello_allreduce.py    # a laptop: 2 processes, gloo
    torchrun --standalone --nproc_per_node 4 stages/06_ddp/hello_allreduce.py    # a GPU node: 4 processes, NCCL
"""

import argparse
import os

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("error: start it with torchrun, which starts the processes and tells each its rank: "
                         "torchrun --standalone --nproc_per_node 2 stages/06_ddp/hello_allreduce.py")
    on_gpus = torch.cuda.is_available()
    if on_gpus:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    # torchrun set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: every process finds the others through them
    dist.init_process_group("nccl" if on_gpus else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([rank + 1.0], device="cuda" if on_gpus else "cpu")
    say(f"rank {rank} of {world_size}: I hold {value.item():.0f}")
    dist.all_reduce(value)  # the sum over all processes, left in `value` on every process
    say(f"rank {rank} of {world_size}: after all_reduce I hold {value.item():.0f}")
    dist.destroy_process_group()


def say(line):
    print(line + "\n", end="", flush=True)  # one write: lines of processes that print at once do not mix


if __name__ == "__main__":
    main()
