"""How fast is all_reduce here? Time torch.distributed.all_reduce, the collective DDP sums the gradients with, for
message sizes from a few KB to a few hundred MB, on every process of the job (gloo between CPU processes, NCCL
between GPUs: each process takes the GPU of its local rank).

    torchrun --standalone --nproc_per_node 2 stages/09_scaling/bench_allreduce.py               # a laptop: gloo
    torchrun --standalone --nproc_per_node 4 stages/09_scaling/bench_allreduce.py --out allreduce-4gpu.json   # NCCL
    srun ... python stages/09_scaling/bench_allreduce.py     # under Slurm: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS

For each size S it prints the time t (the median over --repeats, and their range), the algorithm bandwidth
algbw = S / t and the bus bandwidth busbw = algbw x 2(n-1)/n on n processes, as NVIDIA's nccl-tests report them;
then it fits t(S) = A + 2(n-1)/n x S / B to all sizes: A is the latency (what the smallest message costs), B the
bus bandwidth of large messages. KB, MB and GB in --sizes are 1024-based (as nccl-tests reads its -b and -e sizes);
bandwidths are in GB/s of 1e9 bytes per second.

On GPUs, NCCL_DEBUG=INFO makes NCCL log which network it uses between nodes: the first lines of such a log say
NET/OFI (on Perlmutter's Slingshot, through the aws-ofi-nccl libfabric plugin) or NET/Socket (the fallback over
TCP sockets: ALCF measured the plugin 2 to 3 times faster for communication-bound work on Polaris, also Slingshot).
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common
import distributed

DEFAULT_SIZES = "4KB,16KB,64KB,256KB,1MB,4MB,16MB,64MB,256MB"
UNITS = {"GB": 1024**3, "MB": 1024**2, "KB": 1024, "B": 1}  # the longest suffix first: "MB" before "B"
COMMAND = "torchrun --standalone --nproc_per_node 2 stages/09_scaling/bench_allreduce.py"


def main():
    args = parse_arguments()
    dtype = getattr(torch, args.dtype)
    sizes = parse_sizes(args.sizes)
    check_sizes(sizes, dtype)
    rank, local_rank, world_size, launcher = distributed.ranks_from_launcher()
    if world_size < 2:
        raise common.UserError(f"start it with torchrun or srun, on 2 processes or more, which tell each process its "
                               f"rank: {COMMAND}")  # fmt: skip
    device = distributed.device_for("auto", local_rank)
    distributed.init_process_group(launcher, rank, world_size, device, args.timeout_s)
    per_rank = [time_all_reduce(size, dtype, device, args.warmup, args.repeats) for size in sizes]
    seconds = torch.tensor(per_rank, dtype=torch.float64, device=device)  # one row per size, one column per repeat
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # each repeat's slowest rank: the collective's time, not one rank's
    hostnames = [None] * world_size
    dist.all_gather_object(hostnames, socket.gethostname())
    if rank == 0:
        result = summarize(sizes, seconds.tolist(), args, device, world_size, nodes=len(set(hostnames)))
        print_report(result, args.warmup)
        if args.out:
            write_json(args.out, result)
            say(f"wrote {args.out}")
    distributed.destroy_process_group()


def parse_arguments():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="message sizes, comma-separated: B, KB, MB, GB "
                        f"(1024-based) (default: {DEFAULT_SIZES})")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed all_reduce per size (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed all_reduce per size, first (default: 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the elements' type (default: float32, as DDP's gradients)")  # fmt: skip
    parser.add_argument("--out", help="rank 0 writes the results to this JSON file")
    parser.add_argument("--timeout_s", type=int, default=300,
                        help="a collective that waits longer than this for a rank fails (default: 300)")  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        raise common.UserError(f"--repeats {args.repeats} --warmup {args.warmup}: repeats must be 1 or more, warmup "
                               "0 or more")  # fmt: skip
    return args


def parse_sizes(text):
    """'4KB,1MB' -> [4096, 1048576]: KB, MB, GB are 1024-based; a number alone is in bytes."""
    sizes = []
    for word in text.upper().replace(" ", "").split(","):
        unit = next((unit for unit in UNITS if word.endswith(unit)), "B")
        number = word.removesuffix(unit)
        if not number.isdigit() or int(number) == 0:
            raise common.UserError(f"--sizes {text}: {word!r} is not a size such as 4KB, 16MB or 1GB")
        sizes.append(int(number) * UNITS[unit])
    if len(sizes) < 2:
        raise common.UserError(f"--sizes {text}: give 2 sizes or more, to fit a latency and a bandwidth")
    return sizes


def check_sizes(sizes, dtype):
    for size in sizes:
        if size % dtype.itemsize:
            raise common.UserError(f"--sizes: {size} bytes is not a whole number of {dtype} elements "
                                   f"({dtype.itemsize} bytes each)")  # fmt: skip


def time_all_reduce(size_bytes, dtype, device, warmup, repeats):
    """Every rank calls this: the seconds this rank saw each of `repeats` all_reduce of one buffer of `size_bytes`
    take, after `warmup` untimed ones (the first of a size also sets up connections and buffers)."""
    buffer = torch.zeros(size_bytes // dtype.itemsize, dtype=dtype, device=device)
    for _ in range(warmup):
        dist.all_reduce(buffer)  # zeros sum to zeros: any number of repeats, and the values do not change the time
    seconds = []
    for _ in range(repeats):
        start_together(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        synchronize(device)  # a GPU runs behind the CPU: without this, the clock reads when the work was queued
        seconds.append(time.perf_counter() - start)
    return seconds


def start_together(device):
    """Every rank calls this (a barrier): all ranks start the next all_reduce at the same moment, on an idle GPU."""
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    synchronize(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bus_bandwidth(algbw, world_size):
    """nccl-tests' bus bandwidth of an all-reduce (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):
    each rank sends and receives 2(n-1)/n of the message at best (a reduce-scatter, then an all-gather), so
    algbw x 2(n-1)/n is what each rank's link carried, comparable across numbers of ranks and with the link's peak."""
    return algbw * 2 * (world_size - 1) / world_size


def fit_latency_bandwidth(sizes_bytes, seconds, world_size):
    """(latency A in seconds, bus bandwidth B in bytes/s) of the least-squares line t = A + 2(n-1)/n x S / B
    through (size, time) pairs. A negative A is returned as it is: the caller says so."""
    moved = numpy.array(sizes_bytes, dtype=float) * 2 * (world_size - 1) / world_size  # bytes through each link
    seconds = numpy.array(seconds, dtype=float)
    # Weights 1/t: each size counts by its relative error. Unweighted, the largest size's noise (milliseconds)
    # alone would set the latency (microseconds).
    slope, latency = numpy.polyfit(moved, seconds, 1, w=1 / seconds)
    return float(latency), float(1 / slope)


def summarize(sizes, seconds, args, device, world_size, nodes):
    """The results, as the JSON file holds them: per size, the median time over repeats, the range, algbw, busbw
    (GB = 1e9 bytes); and the fit."""
    medians = [statistics.median(repeats) for repeats in seconds]
    algbw = [size / median / 1e9 for size, median in zip(sizes, medians)]
    latency, bandwidth = fit_latency_bandwidth(sizes, medians, world_size)
    return {"backend": dist.get_backend(), "world_size": world_size, "nodes": nodes,
            "hardware": common.hardware(device), "dtype": args.dtype, "repeats": args.repeats,
            "sizes_bytes": sizes, "seconds": medians, "seconds_range": [[min(r), max(r)] for r in seconds],
            "algbw_GBps": algbw, "busbw_GBps": [bus_bandwidth(bw, world_size) for bw in algbw],
            "fit": {"latency_s": latency, "bus_bandwidth_GBps": bandwidth / 1e9}}  # fmt: skip


def print_report(result, warmup):
    say(f"all_reduce of {result['dtype']} with {result['backend']}: {result['world_size']} processes on "
        f"{result['nodes']} node(s), {result['hardware']}")  # fmt: skip
    say(f"time: the slowest rank's, median and range of {result['repeats']} repeats after {warmup} untimed; "
        "KB and MB are 1024-based, GB/s 1e9 bytes/s")  # fmt: skip
    say(f"{'size':>10}  {'time (median)':>14}  {'range':>22}  {'algbw GB/s':>10}  {'busbw GB/s':>10}")
    for size, median, (low, high), algbw, busbw in zip(result["sizes_bytes"], result["seconds"],
                                                       result["seconds_range"], result["algbw_GBps"],
                                                       result["busbw_GBps"]):  # fmt: skip
        scale, unit = time_unit(median)
        say(f"{format_size(size):>10}  {median * scale:11.1f} {unit:2}  "
            f"{f'{low * scale:.1f} - {high * scale:.1f} {unit}':>22}  {algbw:10.3f}  {busbw:10.3f}")  # fmt: skip
    latency, bandwidth = result["fit"]["latency_s"], result["fit"]["bus_bandwidth_GBps"]
    warnings = []
    if latency < 0:
        warnings.append("a latency below 0: these sizes cannot pin it, add smaller ones")
    if bandwidth <= 0:
        warnings.append("a bandwidth of 0 or less: the times do not grow with the size, add larger ones")
    say(f"fit: t = A + 2(n-1)/n x S / B: latency A = {latency * 1e6:.1f} us, bus bandwidth B = {bandwidth:.3f} GB/s "
        f"(from sizes {format_size(result['sizes_bytes'][0])} to {format_size(result['sizes_bytes'][-1])})"
        + "".join(f"; {warning}" for warning in warnings))  # fmt: skip


def time_unit(seconds):
    """(scale, unit) to print a time in: microseconds below 1 ms, milliseconds below 1 s, else seconds."""
    return (1e6, "us") if seconds < 1e-3 else (1e3, "ms") if seconds < 1 else (1, "s")


def format_size(size_bytes):
    """4096 -> '4 KB', 268435456 -> '256 MB' (1024-based); a size that no unit divides, in bytes."""
    unit = next(unit for unit in UNITS if size_bytes % UNITS[unit] == 0)
    return f"{size_bytes // UNITS[unit]} {unit}"


def write_json(path, result):
    """Write the file whole, then rename it: whoever reads it never sees half a file. One key a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in result.items()]
    temporary.write_text("{\n " + ",\n ".join(lines) + "\n}\n")
    os.replace(temporary, path)


def say(line):
    print(line + "\n", end="", flush=True)  # one write: lines of processes that print at once do not mix


if __name__ == "__main__":
    common.run_main(main, distributed.ranks_from_launcher()[0], known_failures=[distributed.known_failure])
