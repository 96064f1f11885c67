r"""Will it scale? Predict the step time and samples/s of N processes (GPUs) on M nodes from two measurements: a
one-process profile of a training step (train.py --profile_steps) and an all-reduce benchmark (bench_allreduce.py).

    python stages/09_scaling/scaling_model.py --profile runs/09_scaling/profile-1proc/profile/breakdown.json \
        --allreduce runs/09_scaling/allreduce-2proc.json
    python stages/09_scaling/scaling_model.py --perlmutter      # the assumed Perlmutter figures, named and sourced

The model, a function each: an all-reduce is a ring, within a node and then across nodes; DDP all-reduces the
gradient in buckets, each once backward has computed it, one after another; what outlasts backward adds to the
step. The rest of the step is the one-process profile, its data wait, forward and backward scaled with the batch.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common

PARTS = ("data_wait", "forward", "backward", "allreduce_exposed", "optimizer", "other")  # as in breakdown.json
# DDP's buckets once it has seen a step (torch/csrc/distributed/c10d/reducer.cpp, Reducer::rebuild_buckets): in the
# order gradients become ready, the first up to torch.distributed._DEFAULT_FIRST_BUCKET_BYTES (1 MiB), the others up
# to bucket_cap_mb (torch/nn/parallel/distributed.py: _DEFAULT_BUCKET_CAP_MB = 25, in MiB).
FIRST_BUCKET_BYTES = 1024 * 1024
BUCKET_BYTES = 25 * 1024 * 1024
ASSUMED = [
    "all-reduce: a ring within each node of g GPUs, then one across the M nodes for each GPU's 1/g of the gradient",
    "DDP's buckets: the first 1 MiB, the others 25 MiB, all-reduced one after another, each once backward filled it",
    "gradients become ready uniformly during backward; the all-reduce that outlasts backward adds to the step",
    "not modelled: stragglers and jitter, the data loader at scale, NCCL's other algorithms (trees)",
]
STEPS_NEEDED = """
The useful GPU count is also capped by the optimizer steps training needs: in stage 07, bs2048 (60 steps) never
reached the target error that smaller batches reached (stages/07_large_batch/README.md). Strong scaling keeps the
global batch, weak scaling grows it: a bigger global batch is not free."""

# --perlmutter: assumed figures, each with its source.
PM_GPUS_PER_NODE = 4  # 4 A100s and 4 Slingshot-11 NICs per GPU node (docs.nersc.gov/systems/perlmutter/architecture)
NVLINK_BYTES_PER_S = 300e9  # NVLink 3: 600 GB/s per A100, both directions together (NVIDIA A100 datasheet)
# The share of it an all-reduce gets: 8 A100s on NVSwitch measured a bus bandwidth of 230.8 GB/s (nccl-tests,
# 1 GiB; NVIDIA/nccl issue 527; 200 to 208 GB/s in nccl-tests issues 149 and 178), and NCCL 2.7's cost model capped
# an A100's at 235 GB/s (src/graph/tuning.cc). Perlmutter's 4 A100s are linked directly, without NVSwitch: assumed
# the same.
NVLINK_SHARE = 0.77
NIC_BYTES_PER_S = 25e9  # one Slingshot-11 NIC per GPU: 200 Gb/s (HPE Slingshot, "200 Gbps endpoints")
# An assumption: no measured NCCL bus bandwidth on Perlmutter was found. For comparison, InfiniBand HDR nodes of 8
# A100s and 4 NICs reached 85 % of the NICs' peak on average, 96 % at best (NVIDIA/nccl-tests issue 119).
NIC_SHARE = 0.8
# Per ring step, from NCCL 2.30's cost model (src/graph/tuning.cc, hwLatencies, ring, Simple protocol): 3.4 us over
# NVLink, 14 us over the network. Assumed: that model is NCCL's guess, not a measurement of Perlmutter; NCCL adds
# ~8 us per call (baseLatencies, left out here) and picks trees and other protocols for small messages.
NVLINK_STEP_LATENCY_S = 3.4e-6
NETWORK_STEP_LATENCY_S = 14e-6
PERLMUTTER_LINKS = {
    "intra_latency_s": NVLINK_STEP_LATENCY_S, "intra_bandwidth": NVLINK_SHARE * NVLINK_BYTES_PER_S,
    "inter_latency_s": NETWORK_STEP_LATENCY_S, "inter_bandwidth": NIC_SHARE * NIC_BYTES_PER_S,
}  # fmt: skip
# One GPU's step, measured on one H100 (stages/05_amp/README.md, "Expected output": the `default` model alone, bf16
# autocast, fused AdamW): 2517 samples/s at batch 64, 6534 at batch 256. The whole training loop of stage 03 ran at
# about 1700 (stages/03_checkpoint_restart/README.md): data wait is left out here, as if the loader kept up.
H100_SAMPLES_PER_S = {64: 2517, 256: 6534}
A100_SLOWER = 1.5  # an assumption: an A100 takes 1.5 times the H100's step
OPTIMIZER_S = 0.5e-3  # an assumption: fused AdamW over 1.9 M parameters, a few kernels
BACKWARD_PER_FORWARD = 2  # an assumption: backward takes twice forward (two products per layer to forward's one)
DEFAULT_MODEL = (32, 4)  # config.yaml `default`: base_channels 32, depth 4


def ring_allreduce_s(size_bytes, processes, step_latency_s, bandwidth):
    """A ring all-reduce of S bytes over n processes: 2(n-1) steps (reduce-scatter, then all-gather), each sending
    S/n bytes: t = 2(n-1) a + 2(n-1)/n S / B, a the latency of a step, B the bus bandwidth in bytes/s; 0 for n = 1."""
    if processes == 1:
        return 0.0
    return 2 * (processes - 1) * step_latency_s + 2 * (processes - 1) / processes * size_bytes / bandwidth


def two_level_allreduce_s(size_bytes, nodes, gpus_per_node, links):
    """An all-reduce on M nodes of g GPUs, as NCCL uses a node's fast links and its NICs: a ring within the node
    (2(g-1) a_intra + 2(g-1)/g S / B_intra), and across the nodes, each GPU all-reduces its 1/g of the gradient over
    its own NIC (2(M-1) a_inter + 2(M-1)/M (S/g) / B_inter). M = 1: a ring within the node; g = 1: across nodes."""
    within = ring_allreduce_s(size_bytes, gpus_per_node, links["intra_latency_s"], links["intra_bandwidth"])
    across = ring_allreduce_s(size_bytes / gpus_per_node, nodes, links["inter_latency_s"], links["inter_bandwidth"])
    return within + across


def links_from_benchmark(benchmark):
    """Latency per ring step and bus bandwidth (bytes/s) from bench_allreduce.py's fit on n processes,
    t(S) = A + 2(n-1)/n S / B: a = A / (2(n-1)). One benchmark stands for the links within and across nodes."""
    step_latency_s = max(0.0, benchmark["fit"]["latency_s"]) / (2 * (benchmark["world_size"] - 1))  # < 0: noise
    bandwidth = benchmark["fit"]["bus_bandwidth_GBps"] * 1e9
    return {"intra_latency_s": step_latency_s, "intra_bandwidth": bandwidth,
            "inter_latency_s": step_latency_s, "inter_bandwidth": bandwidth}  # fmt: skip


def bucket_sizes(gradient_bytes, first_cap=FIRST_BUCKET_BYTES, cap=BUCKET_BYTES):
    """DDP's gradient buckets in the order backward fills them: the first up to 1 MiB, the others up to 25 MiB. (DDP
    puts whole tensors in a bucket, so its buckets run a little over or under: the model splits bytes.)"""
    sizes = []
    while gradient_bytes > 0:
        sizes.append(min(gradient_bytes, cap if sizes else first_cap))
        gradient_bytes -= sizes[-1]
    return sizes


def exposed_allreduce_s(bucket_bytes, bucket_seconds, backward_s):
    """The all-reduce time that outlasts backward. Gradients become ready uniformly during backward (an assumption):
    bucket i is ready at backward_s x (bytes up to and including bucket i) / S; the all-reduces run one after
    another: start_i = max(ready_i, end_(i-1)), end_i = start_i + t_i. Exposed = max(0, end_last - backward_s)."""
    ready_bytes, end = 0, 0.0
    for size, seconds in zip(bucket_bytes, bucket_seconds):
        ready_bytes += size
        end = max(backward_s * ready_bytes / sum(bucket_bytes), end) + seconds
    return max(0.0, end - backward_s)


def predict_step(profile, links, world_size, nodes, per_process_batch):
    """The step of `world_size` processes on `nodes` nodes at `per_process_batch`, part by part, from a one-process
    profile (breakdown.json) measured at batch b0: data wait, forward and backward scale with b/b0 (true on a CPU,
    optimistic for a GPU below b0: profile at the batch you will use), optimizer and other stay as measured, plus
    the exposed all-reduce. samples/s = N b / step."""
    if world_size % nodes:
        raise ValueError(f"{world_size} processes do not spread evenly over {nodes} nodes")
    scale = per_process_batch / profile["per_process_batch"]
    measured = profile["parts_s"]
    step = {name: measured[name] * (scale if name in ("data_wait", "forward", "backward") else 1) for name in PARTS}
    buckets = bucket_sizes(profile["gradient_bytes"])
    seconds = [two_level_allreduce_s(size, nodes, world_size // nodes, links) for size in buckets]
    step["allreduce_exposed"] = exposed_allreduce_s(buckets, seconds, step["backward"])
    step["allreduce_whole_s"] = sum(seconds)
    step["allreduce_hidden_s"] = step["allreduce_whole_s"] - step["allreduce_exposed"]
    step["step_s"] = sum(step[name] for name in PARTS)
    step["samples_per_s"] = world_size * per_process_batch / step["step_s"]
    return step


def gpu_counts(gpus_per_node, max_nodes=32):
    """1, 2, 4... up to one node, then 2 to `max_nodes` nodes (1, 2, 4, 8, ... 128 for 4 GPUs a node)."""
    within = [2**k for k in range(8) if 2**k < gpus_per_node]
    return within + [gpus_per_node * 2**k for k in range(max_nodes.bit_length())]


def impossible(global_batch, gpus):
    """Why `gpus` processes cannot share `global_batch` (train.py refuses it), or None."""
    if global_batch < gpus:
        return f"{global_batch} samples for {gpus} GPUs: a per-GPU batch of 0"
    if global_batch % gpus:
        return f"the global batch must divide by the world size ({global_batch} by {gpus})"
    return None


def strong_scaling(profile_at, links, global_batch, counts, gpus_per_node):
    """Strong scaling: N GPUs share a fixed global batch G (b = G/N), a row per GPU count of `counts`.
    profile_at(b) is the one-process profile to start from at a per-process batch b."""
    one_gpu = predict_step(profile_at(global_batch), links, 1, 1, global_batch)["samples_per_s"]
    return [scaling_row(profile_at, links, gpus, global_batch, gpus_per_node, one_gpu) for gpus in counts]


def weak_scaling(profile_at, links, per_process_batch, counts, gpus_per_node):
    """Weak scaling: each of N GPUs keeps its batch b, the global batch grows (G = N b)."""
    one_gpu = predict_step(profile_at(per_process_batch), links, 1, 1, per_process_batch)["samples_per_s"]
    return [scaling_row(profile_at, links, gpus, gpus * per_process_batch, gpus_per_node, one_gpu) for gpus in counts]


def scaling_row(profile_at, links, gpus, global_batch, gpus_per_node, one_gpu_samples_per_s):
    """One GPU count: its predicted step and efficiency = samples/s(N) / (N samples/s(1)); or, where the processes
    cannot share the global batch, why not ("impossible")."""
    batch = global_batch // gpus
    row = {"gpus": gpus, "nodes": max(1, gpus // gpus_per_node), "batch": batch, "global_batch": global_batch,
           "impossible": impossible(global_batch, gpus)}  # fmt: skip
    if row["impossible"] is None:
        row |= predict_step(profile_at(batch), links, gpus, row["nodes"], batch)
        row["efficiency"] = row["samples_per_s"] / (gpus * one_gpu_samples_per_s)
    return row


def default_gradient_bytes():
    """The gradient of config.yaml's `default` U-Net: 4 bytes (float32) per parameter."""
    return 4 * sum(parameter.numel() for parameter in common.UNet(*DEFAULT_MODEL).parameters())


def a100_profile(per_gpu_batch, gradient_bytes):
    """An assumed one-A100 profile at a per-GPU batch. A GPU's step is not proportional to its batch (the H100 took
    1.54 times as long for 4 times the batch): the step is the line through the H100's two measured steps, times
    A100_SLOWER; of it, OPTIMIZER_S is the optimizer, the rest forward and backward (BACKWARD_PER_FORWARD)."""
    (batch_1, step_1), (batch_2, step_2) = [(batch, batch / rate) for batch, rate in H100_SAMPLES_PER_S.items()]
    step = A100_SLOWER * (step_1 + (step_2 - step_1) / (batch_2 - batch_1) * (per_gpu_batch - batch_1))
    forward = (step - OPTIMIZER_S) / (1 + BACKWARD_PER_FORWARD)
    parts = dict.fromkeys(PARTS, 0.0) | {"forward": forward, "backward": BACKWARD_PER_FORWARD * forward,
                                         "optimizer": OPTIMIZER_S}  # fmt: skip
    return {"world_size": 1, "per_process_batch": per_gpu_batch, "gradient_bytes": gradient_bytes, "parts_s": parts}


def a100_profiles(gradient_bytes):
    """profile_at for strong_scaling and weak_scaling: the assumed A100 profile at any per-GPU batch."""
    return lambda per_gpu_batch: a100_profile(per_gpu_batch, gradient_bytes)


def print_table(title, rows):
    print(f"\n{title}\n{'GPUs':>5} {'nodes':>5} {'batch/GPU':>9} {'global':>7} {'step ms':>9} {'all-reduce ms':>13} "
          f"{'exposed ms':>10} {'samples/s':>10} {'efficiency':>10}")  # fmt: skip
    for row in rows:
        start = f"{row['gpus']:>5} {row['nodes']:>5} "
        if row["impossible"]:
            print(f"{start}{'-':>9} {row['global_batch']:>7}   impossible: {row['impossible']}")
        else:
            print(f"{start}{row['batch']:>9} {row['global_batch']:>7} {1e3 * row['step_s']:>9.2f} "
                  f"{1e3 * row['allreduce_whole_s']:>13.3f} {1e3 * row['allreduce_exposed']:>10.3f} "
                  f"{row['samples_per_s']:>10.0f} {row['efficiency']:>10.2f}")  # fmt: skip


def report_measured(profile_path, allreduce_path, global_batch, per_process_batch, gpus_per_node):
    profile, benchmark = read_json(profile_path), read_json(allreduce_path)
    if profile["world_size"] != 1:
        raise common.UserError(f"{profile_path} profiles {profile['world_size']} processes: the model starts from "
                               "one (train.py --profile_steps, without torchrun)")  # fmt: skip
    links, counts = links_from_benchmark(benchmark), gpu_counts(gpus_per_node)
    per_process_batch = per_process_batch or profile["per_process_batch"]
    print(f"profile: {profile_path}: {profile['hardware']}, batch {profile['per_process_batch']}, step "
          f"{1e3 * profile['step_s']:.2f} ms (its parts, which the model uses: "
          f"{1e3 * sum(profile['parts_s'].values()):.2f} ms), gradient {profile['gradient_bytes'] / 1e6:.3f} MB")
    print(f"all-reduce: {allreduce_path}: {benchmark['backend']}, {benchmark['world_size']} processes on "
          f"{benchmark['nodes']} node(s), {benchmark['hardware']}: {1e6 * links['intra_latency_s']:.1f} us per ring "
          f"step, bus bandwidth {links['intra_bandwidth'] / 1e9:.3f} GB/s")  # fmt: skip
    for line in ["the measured link stands for the links within and across nodes", *ASSUMED,
                 "data wait, forward and backward scale with the per-process batch; optimizer and other stay"]:
        print(f"assumed: {line}")  # fmt: skip

    def profile_at(batch):
        return profile  # the one measured: predict_step scales it to the batch
    print_table(f"strong scaling: global batch {global_batch}, {gpus_per_node} GPUs a node",
                strong_scaling(profile_at, links, global_batch, counts, gpus_per_node))  # fmt: skip
    print_table(f"weak scaling: {per_process_batch} per GPU, {gpus_per_node} GPUs a node",
                weak_scaling(profile_at, links, per_process_batch, counts, gpus_per_node))  # fmt: skip
    print(STEPS_NEEDED)


def report_perlmutter():
    gradient, counts, links = default_gradient_bytes(), gpu_counts(PM_GPUS_PER_NODE), PERLMUTTER_LINKS
    h100_ms = [f"{1e3 * batch / rate:.1f} ms at batch {batch}" for batch, rate in H100_SAMPLES_PER_S.items()]
    print("Perlmutter, predicted from assumed figures (scaling_model.py's constants name their sources):")
    for line in [
        f"{PM_GPUS_PER_NODE} A100s a node, NVLink 3: {NVLINK_BYTES_PER_S / 1e9:.0f} GB/s each way x {NVLINK_SHARE} = "
        f"{links['intra_bandwidth'] / 1e9:.0f} GB/s bus bandwidth, {1e6 * NVLINK_STEP_LATENCY_S} us per ring step",
        f"one Slingshot-11 NIC per GPU: {NIC_BYTES_PER_S / 1e9:.0f} GB/s x {NIC_SHARE} = "
        f"{links['inter_bandwidth'] / 1e9:.0f} GB/s, {1e6 * NETWORK_STEP_LATENCY_S:.0f} us per ring step",
        f"an A100's step: {A100_SLOWER} x the H100's, on the line through its {' and '.join(h100_ms)}",
        f"of it: optimizer {1e3 * OPTIMIZER_S} ms, backward {BACKWARD_PER_FORWARD} x forward, data wait 0",
        f"`default` (base_channels {DEFAULT_MODEL[0]}, depth {DEFAULT_MODEL[1]}): gradient {gradient / 1e6:.2f} MB, "
        f"buckets {', '.join(f'{size / 1e6:.2f}' for size in bucket_sizes(gradient))} MB",
        *ASSUMED,
    ]:
        print(f"assumed: {line}")
    profile_at = a100_profiles(gradient)
    for global_batch in (64, 256):
        print_table(f"Perlmutter, strong scaling: global batch {global_batch}",
                    strong_scaling(profile_at, links, global_batch, counts, PM_GPUS_PER_NODE))  # fmt: skip
    print_table("Perlmutter, weak scaling: 64 per GPU", weak_scaling(profile_at, links, 64, counts, PM_GPUS_PER_NODE))
    print("\nNERSC's SC22 tutorial (NERSC/sc22-dl-tutorial README, 'Weak and Strong Throughput Scaling') measured its\n"
          "3D U-Net at 32 nodes: about 78 % weak-scaling efficiency at 64 per GPU (communication overhead ~25 %),\n"
          "about 89 % at 128 per GPU (about 12 %). `default` at 32 nodes, by this model:")
    cases = [(f"{batch} per GPU", batch, 1) for batch in (1, 4, 16, 64, 256, 1024)]
    cases += [(f"{times} x the gradient ({times * gradient / 1e6:.0f} MB), 64 per GPU, the same step", 64, times)
              for times in (4, 16, 64, 256)]  # fmt: skip
    for label, batch, times in cases:
        row = weak_scaling(a100_profiles(times * gradient), links, batch, counts[-1:], PM_GPUS_PER_NODE)[0]
        print(f"  {label:<58} efficiency {row['efficiency']:.2f}, exposed all-reduce "
              f"{row['allreduce_exposed'] / row['step_s']:5.1%} of the step")  # fmt: skip
    print(STEPS_NEEDED)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise common.UserError(f"cannot read {path}: {error}") from None


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--profile", help="breakdown.json of a one-process run of train.py --profile_steps")
    parser.add_argument("--allreduce", help="the JSON file bench_allreduce.py --out wrote")
    parser.add_argument("--perlmutter", action="store_true", help="predict Perlmutter from the assumed figures")
    parser.add_argument("--global_batch", type=int, default=64, help="strong scaling's global batch (default: 64)")
    parser.add_argument("--per_process_batch", type=int, help="weak scaling's batch per GPU (default: the profile's)")
    parser.add_argument("--gpus_per_node", type=int, default=4, help="GPUs (processes) a node (default: 4)")
    args = parser.parse_args()
    if min(args.global_batch, args.gpus_per_node, args.per_process_batch or 1) < 1:
        raise common.UserError("--global_batch, --per_process_batch and --gpus_per_node take 1 or more")
    if args.perlmutter:
        report_perlmutter()
    elif args.profile and args.allreduce:
        report_measured(args.profile, args.allreduce, args.global_batch, args.per_process_batch, args.gpus_per_node)
    else:
        raise common.UserError("give --profile and --allreduce (measured figures), or --perlmutter (assumed ones)")


if __name__ == "__main__":
    common.run_main(main)
