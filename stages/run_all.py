"""The tour: run every stage, one after another, then print one table from their run summaries.

    python stages/run_all.py                   # the `quick` configs: a CPU is fine
    python stages/run_all.py --config full     # on a GPU node
    python stages/run_all.py --stages 01 02    # some stages only
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

STAGES_DIR = Path(__file__).resolve().parent


def stage_dirs(prefixes):
    stages = sorted(p for p in STAGES_DIR.iterdir() if p.is_dir() and p.name[:2].isdigit())
    return [s for s in stages if not prefixes or any(s.name.startswith(p) for p in prefixes)]


def run_notebook(stage, config, tour_dir):
    """Execute the notebook as a learner would; its settings follow the config (quick, or the device's)."""
    settings = "quick" if config == "quick" else ("gpu" if common.choose_device().type == "cuda" else "cpu")
    out_dir = tour_dir / stage.name
    env = {**os.environ, "TUTORIAL_NOTEBOOK_SETTINGS": settings, "TUTORIAL_OUT_DIR": str(out_dir)}
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               str(stage / "train.ipynb"), "--output-dir", str(tour_dir), "--output", stage.name]  # fmt: skip
    return subprocess.run(command, env=env).returncode, out_dir


def run_script(stage, config, tour_dir):
    out_dir = tour_dir / stage.name
    command = [sys.executable, str(stage / "train.py"), "--config", config, "--out_dir", str(out_dir)]
    return subprocess.run(command).returncode, out_dir


def table(rows):
    header = ["stage", "samples/s", "data wait", "val loss", "rel. L2 (baseline)", "beats baseline", "wall time",
              "device"]  # fmt: skip
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
        s["hardware"],
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick", help="the named config every stage runs (default: quick)")
    parser.add_argument("--stages", nargs="*", default=[], help="stage name prefixes, e.g. 01 02 (default: all)")
    parser.add_argument("--out_dir", help="default: runs/tour/<config> (or under $SCRATCH)")
    args = parser.parse_args()
    tour_dir = common.run_dir("tour", args.config, args.out_dir)

    rows, failed = [], []
    for stage in stage_dirs(args.stages):
        print(f"\n=== {stage.name} ({args.config}) ===", flush=True)
        start = time.perf_counter()
        runner = run_notebook if (stage / "train.ipynb").exists() else run_script
        returncode, out_dir = runner(stage, args.config, tour_dir)
        if returncode != 0:
            failed.append(stage.name)
            rows.append([stage.name, "failed", "", "", "", "", f"{time.perf_counter() - start:.0f} s", ""])
        else:
            rows.append(summary_row(stage.name, out_dir))

    print(f"\nThe tour, config {args.config!r} (summaries under {tour_dir}):\n")
    print(table(rows))
    if failed:
        sys.exit(f"\nerror: these stages failed: {', '.join(failed)}; their output is above")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
