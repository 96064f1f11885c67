"""Where a step's time goes (stage 09's concept): torch.profiler over a few steps of a run (--profile_steps 21-25),
one trace per rank that Perfetto (https://ui.perfetto.dev) and Chrome (chrome://tracing) open, and the mean step
split into its parts:

    data wait | forward | backward | all-reduce not hidden behind backward | optimizer | other

Every part is measured from the profiler's events, none is what is left over: the ranges train.py names with
part() (torch.profiler.record_function), the all-reduces' own events (gloo's on its threads, NCCL's kernels on a
GPU), the last computation of each backward, and for "other" every event of the step outside those ranges (the
loss summed, a log line's all-reduce). Their sum is then checked against the step's own time: what no event covers
(Python between the ranges) shows up as a gap, and the breakdown says when it is over TOLERANCE.
"""

import contextlib
import json
import logging

import torch
from torch.profiler import ProfilerActivity, record_function

import common
import distributed

log = logging.getLogger(__name__)
PARTS = ("data_wait", "forward", "backward", "allreduce_exposed", "optimizer", "other")
NAMED = {"data wait": "data_wait", "forward": "forward", "backward": "backward", "optimizer": "optimizer"}
TOLERANCE = 0.05  # the parts must add up to the step's time within 5 % of it
OTHER_LIMIT = 0.15  # above 15 % of the step, "other" hides something worth naming


@contextlib.contextmanager
def part(name, device):
    """A named range of a step, for the profile. While the profiler runs on a GPU, the range ends when the GPU has
    done its work: the GPU runs behind the CPU, and the range would otherwise time only the queueing of the work.
    On a GPU it is also an NVTX range, which Nsight Systems shows on its timeline (see submit_scaling_pm.sh)."""
    nvtx = torch.cuda.nvtx.range(name) if device.type == "cuda" else contextlib.nullcontext()
    with record_function(name), nvtx:
        yield
        if device.type == "cuda" and torch.autograd._profiler_enabled():
            torch.cuda.synchronize(device)


def profiled_steps(text, batches_per_epoch, total_steps):
    """(first, last) of --profile_steps FIRST-LAST, or None when it is not set; a UserError if the steps cannot be
    profiled: step 1 starts the DataLoader's workers (it is no typical step), and the last step of an epoch
    validates and checkpoints, which a step's breakdown is not about."""
    if not text:
        return None
    first, _, last = str(text).partition("-")
    if not (first.isdigit() and last.isdigit() and 2 <= int(first) <= int(last)):
        raise common.UserError(f"--profile_steps {text}: give FIRST-LAST, two step numbers from 2 on, e.g. 21-25")
    first, last = int(first), int(last)
    if last >= total_steps or (first - 1) // batches_per_epoch != last // batches_per_epoch:
        raise common.UserError(f"--profile_steps {text}: the steps must lie within one epoch ({batches_per_epoch} "
                               f"steps each, {total_steps} in all), before its last step, which validates and "
                               f"checkpoints: e.g. 21-25 of `quick`")  # fmt: skip
    return first, last


def next_step(profiler, setup, state):
    """Every rank calls this at the start of every step (an all-reduce after the last profiled one): it starts the
    profiler a step before --profile_steps (a warm-up step, not recorded), marks where each step begins, and after
    the last one writes the traces and the breakdown. Returns the profiler while it runs, else None."""
    steps = profiled_steps(setup.cfg.profile_steps, setup.batches_per_epoch, setup.cfg.num_epochs *
                           setup.batches_per_epoch)  # fmt: skip
    if steps is None or (profiler is None and state.step + 2 != steps[0]):
        return None
    if profiler is None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
        schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps[1] - steps[0] + 1, repeat=1)
        profiler = torch.profiler.profile(activities=activities, schedule=schedule)
        profiler.start()
        return profiler
    profiler.step()
    if state.step < steps[1]:
        return profiler
    profiler.stop()
    write_profile(profiler, setup, state, steps)
    return None


def write_profile(profiler, setup, state, steps):
    """Every rank calls this (an all-reduce): each writes its trace; rank 0 prints and saves the breakdown of the
    mean step, averaged over the ranks."""
    folder = setup.out_dir / "profile"
    folder.mkdir(exist_ok=True)
    profiler.export_chrome_trace(str(folder / f"trace-rank{setup.rank}.json"))
    figures = breakdown(profiler.events(), setup.device)
    figures = dict(zip(figures, distributed.all_reduce_mean(*figures.values())))  # the mean over the ranks
    if setup.rank != 0:
        return
    gradient_bytes = sum(p.numel() * p.element_size() for p in state.model.parameters() if p.requires_grad)
    summary = {"world_size": setup.world_size, "per_process_batch": setup.sampler.local_batch, "steps": steps,
               "gradient_bytes": gradient_bytes, "hardware": common.hardware(setup.device)}  # fmt: skip
    summary |= {"step_s": figures["step"], "sum_of_parts_s": sum(figures[name] for name in PARTS)}
    summary |= {"parts_s": {name: figures[name] for name in PARTS}}
    summary |= {"allreduce_whole_s": figures["allreduce_whole"], "allreduce_hidden_s": figures["allreduce_hidden"]}
    (folder / "breakdown.json").write_text(json.dumps(summary, indent=1) + "\n")
    report(summary, folder)


def report(summary, folder):
    step, parts = summary["step_s"], summary["parts_s"]
    names = {"data_wait": "data wait", "allreduce_exposed": "all-reduce not hidden"}
    terms = " + ".join(f"{names.get(name, name)} {1e3 * seconds:.2f}" for name, seconds in parts.items())
    first, last = summary["steps"]
    log.info(f"profile of steps {first}-{last}, mean over {summary['world_size']} rank(s): step {1e3 * step:.2f} ms "
             f"= {terms} (sum {1e3 * summary['sum_of_parts_s']:.2f} ms); all-reduce "
             f"{1e3 * summary['allreduce_whole_s']:.2f} ms in all, {1e3 * summary['allreduce_hidden_s']:.2f} hidden "
             f"behind backward")  # fmt: skip
    log.info(f"profile: {folder}/breakdown.json; traces {folder}/trace-rank*.json (open them in ui.perfetto.dev)")
    if abs(summary["sum_of_parts_s"] - step) > TOLERANCE * step:
        log.warning(f"profile: the parts add up to {summary['sum_of_parts_s'] / step:.0%} of the step, beyond "
                    f"{TOLERANCE:.0%}: some of the step is in no event (look at the gaps in the trace)")  # fmt: skip
    if parts["other"] > OTHER_LIMIT * step:
        log.warning(f"profile: 'other' is {parts['other'] / step:.0%} of the step: a log line, checkpoint or "
                    "validation among the profiled steps? (--log_every, --checkpoint_every)")  # fmt: skip


def breakdown(events, device):
    """The mean profiled step, in seconds: its time, its parts (PARTS), and the all-reduce's whole time and the part
    of it hidden behind backward."""
    cpu = torch.autograd.DeviceType.CPU  # on a GPU, each step's range has a GPU-side copy too
    steps = [event for event in events if event.name.startswith("ProfilerStep") and event.device_type == cpu]
    thread = steps[0].thread  # the main thread, where train.py runs
    totals = dict.fromkeys(("step", *PARTS, "allreduce_whole", "allreduce_hidden"), 0.0)
    for step in steps:
        start, end = step.time_range.start, step.time_range.end
        inside = [event for event in events if start <= event.time_range.start and event.time_range.end <= end]
        # The main thread's own events: a GPU event's thread is the thread that launched it (the main one, seen on
        # an H200), and the GPU-side copy of the step's range would otherwise count as "other", a whole step long.
        on_main = [event for event in inside if event.thread == thread and event.device_type == cpu]
        ranges = [event for event in on_main if event.name in NAMED]
        for event in ranges:
            totals[NAMED[event.name]] += event.time_range.elapsed_us()
        allreduces = [allreduce_interval(event) for event in events if is_allreduce(event)]
        allreduces = [(max(a, start), min(b, end)) for a, b in allreduces if a < end and b > start]
        exposed = sum(exposed_allreduce(event, inside, device) for event in ranges if event.name == "backward")
        totals["backward"] -= exposed
        totals["allreduce_exposed"] += exposed
        totals["allreduce_whole"] += union_length(allreduces)
        totals["allreduce_hidden"] += max(0.0, union_length(allreduces) - exposed)
        top_level = [event for event in on_main if event.cpu_parent in (None, step)]
        others = [event.time_range for event in top_level if event.name not in NAMED and event is not step]
        totals["other"] += union_length([(r.start, r.end) for r in others])
        totals["step"] += end - start
    return {name: value / len(steps) / 1e6 for name, value in totals.items()}  # microseconds to seconds


def is_allreduce(event):
    """gloo's all-reduce (on its own threads), or NCCL's kernel on the GPU."""
    name = event.name.lower()
    if event.device_type == torch.autograd.DeviceType.CUDA:
        return name.startswith("nccl") and "allreduce" in name.replace("_", "")
    return name in ("gloo:all_reduce", "nccl:all_reduce")


def allreduce_interval(event):
    return event.time_range.start, event.time_range.end


def exposed_allreduce(backward, inside, device):
    """The all-reduce not hidden behind this backward: the time from its last computation (the last autograd
    function on a CPU, the last kernel but NCCL's on a GPU) to its end, when DDP waits for the last buckets' all-
    reduces and copies their averages into the gradients. Without an all-reduce (one process), nothing."""
    start, end = backward.time_range.start, backward.time_range.end
    within = [event for event in inside if start <= event.time_range.start and event.time_range.end <= end]
    if not any(is_allreduce(event) for event in within) and not any("reducer" in event.name for event in within):
        return 0.0
    if device.type == "cuda":  # kernels; not the GPU-side copies of the named ranges (user annotations)
        compute = [e for e in within if e.device_type == torch.autograd.DeviceType.CUDA and not is_allreduce(e)
                   and not e.is_user_annotation]  # fmt: skip
    else:
        compute = [e for e in within if e.thread == backward.thread and e.name.startswith("autograd::engine")]
    last_compute_end = max((event.time_range.end for event in compute), default=start)
    return max(0.0, end - last_compute_end)


def union_length(intervals):
    """The time covered by intervals (start, end) that may overlap."""
    covered, reach = 0.0, -float("inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered
