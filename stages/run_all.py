"""The tour: run every stage, one after another, then print one table from their run summaries.

    python stages/run_all.py                   # the `quick` configs: a CPU is fine
    python stages/run_all.py --config full     # on a GPU node
    python stages/run_all.py --stages 01 02    # some stages only

From stage 06 on (the stages with a distributed.py), a stage runs under torchrun: one process per GPU, or 2 on
a CPU (--nproc_per_node N changes that).

A stage may carry its own settings, and settings after `--` go to every stage's train.py, for runs side by side:

    python stages/run_all.py --config full --stages 02 04 05 "05 --compile true" -- --num_epochs 2
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

STAGES_DIR = Path(__file__).resolve().parent


def stage_dirs(prefixes):
    stages = sorted(p for p in STAGES_DIR.iterdir() if p.is_dir() and p.name[:2].isdigit())
    return [s for s in stages if not prefixes or any(s.name.startswith(p) for p in prefixes)]


def planned_runs(items, shared, config):
    """[(stage folder, its settings, row label)] from items such as "05" or "05 --compile true". Each run's
    settings are checked now: a typo in the last one stops the tour before the first one starts."""
    runs = [(stage, shared, stage.name) for stage in stage_dirs([])] if not items else []
    for item in items:
        prefix, *own = item.split()
        stages = stage_dirs([prefix])
        if len(stages) != 1:
            raise common.UserError(f"--stages {item!r}: {prefix!r} names {len(stages)} stages; give one, e.g. 05")
        runs.append((stages[0], own + shared, " ".join([stages[0].name, *own])))
    for stage, settings, label in runs:
        if (stage / "train.ipynb").exists() and settings:
            raise common.UserError(f"{stage.name} is a notebook: settings go to the script stages only")
        if (stage / "train.py").exists():
            try:
                common.load_config(stage / "config.yaml", ["--config", config, *settings])
            except common.UserError as error:
                raise common.UserError(f"{label}: {error}") from None
    return runs


def run_notebook(stage, config, tour_dir):
    """Execute the notebook as a learner would; its settings follow the config (quick, or the device's)."""
    settings = "quick" if config == "quick" else ("gpu" if common.choose_device().type == "cuda" else "cpu")
    out_dir = tour_dir / stage.name
    env = {**os.environ, "TUTORIAL_NOTEBOOK_SETTINGS": settings, "TUTORIAL_OUT_DIR": str(out_dir)}
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               str(stage / "train.ipynb"), "--output-dir", str(tour_dir), "--output", stage.name]  # fmt: skip
    return subprocess.run(command, env=env).returncode, out_dir


def script_command(stage, config, out_dir, settings=(), nproc_per_node=None):
    launcher = [sys.executable]
    if (stage / "distributed.py").exists():  # data parallel: torchrun starts the processes
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node)]
    return [*launcher, str(stage / "train.py"), "--config", config, *settings, "--out_dir", str(out_dir)]


def run_script(stage, config, tour_dir, settings=(), label=None, nproc_per_node=None):
    out_dir = tour_dir / (label or stage.name).replace(" --", "_").replace(" ", "-")
    return subprocess.run(script_command(stage, config, out_dir, settings, nproc_per_node)).returncode, out_dir


def table(rows):
    header = ["stage", "samples/s", "data wait", "val loss", "rel. L2 (baseline)", "beats baseline", "wall time",
              "first step", "peak GPU memory", "processes", "device"]  # fmt: skip
    lines = [header] + rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def summary_row(stage, out_dir):
    s = common.read_summary(out_dir)
    return [
        stage,
        f"{s['samples_per_s']:.0f}",
        f"{s['data_wait_share']:.0%}",
        f"{s['final_val_loss']:.4f}",
        f"{s['val_relative_l2']:.3f} ({s['baseline_relative_l2']:.3f})",
        "yes" if s["val_relative_l2"] < s["baseline_relative_l2"] else "no",
        f"{s['wall_time_s']:.0f} s",
        f"{s['first_step_s']:.1f} s" if "first_step_s" in s else "-",  # stage 05 on: compiling shows here
        f"{s['peak_gpu_memory_gib']:.1f} GiB" if s.get("peak_gpu_memory_gib") else "-",
        str(s.get("world_size", 1)),  # stage 06 on: processes training together (each on this hardware)
        s["hardware"],
    ]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", default="quick", help="the named config every stage runs (default: quick)")
    help_stages = 'stage name prefixes, each with its own settings if any: 01 02 "05 --compile true" (default: all)'
    parser.add_argument("--stages", nargs="*", default=[], help=help_stages)
    parser.add_argument("--out_dir", help="default: runs/tour/<config> (or under $SCRATCH)")
    parser.add_argument("--nproc_per_node", type=int, help="processes of stage 06 on (default: the GPUs, or 2)")
    argv = sys.argv[1:]
    shared = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    runs = planned_runs(args.stages, shared, args.config)
    nproc = args.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    tour_dir = common.run_dir("tour", args.config, args.out_dir)

    rows, failed = [], []
    for stage, settings, label in runs:
        print(f"\n=== {label} ({args.config}) ===", flush=True)
        start = time.perf_counter()
        if (stage / "train.ipynb").exists():
            returncode, out_dir = run_notebook(stage, args.config, tour_dir)
        else:
            returncode, out_dir = run_script(stage, args.config, tour_dir, settings, label, nproc)
        if returncode != 0:
            failed.append(label)
            rows.append([label, "failed", "", "", "", "", f"{time.perf_counter() - start:.0f} s", "", "", "", ""])
        else:
            rows.append(summary_row(label, out_dir))

    print(f"\nThe tour, config {args.config!r} (summaries under {tour_dir}):\n")
    print(table(rows))
    if failed:
        sys.exit(f"\nerror: these stages failed: {', '.join(failed)}; their output is above")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
