"""The batch-size study: train every `bs*` config of config.yaml, one after another, on one data preset, then
compare them by the time each takes to reach a target validation error (not by samples/s).

    python stages/07_large_batch/study.py --preset small --micro_batch_size 64   # a CPU: about 40 min on 2 cores
    python stages/07_large_batch/study.py --preset full                     # a GPU node: every GPU, via torchrun
    python stages/07_large_batch/study.py --preset small --configs bs64 bs512   # some of them

Each run's folder gets its log, TensorBoard events and summary.json; its checkpoints are deleted once it has
finished (the study keeps curves, not weights). A run that finished already is not run again, so a study that
was stopped resumes where it was. The table goes to study.txt in the output folder, the figure (validation
error against optimizer steps and against wall time) to study.png beside it; for a reference study in
example_logs/, to tutorial_images/<its folder name>.png instead, where the README shows it
(tutorial_images/make_figures.py draws it again from the logs, with the same code).
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

STAGE = Path(__file__).resolve().parent
sys.path.insert(0, str(STAGE.parent))  # find `common` from any working directory
sys.path.insert(0, str(STAGE.parents[1] / "tutorial_images"))
import common
import make_figures

BATCH_CONFIGS = [name for name in yaml.safe_load((STAGE / "config.yaml").read_text()) if name.startswith("bs")]


def run_config(name, preset, out_dir, nproc, extra):
    """Train one config to the end (or resume it), as a learner would; then drop its checkpoints."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = [*launcher, str(STAGE / "train.py"), "--config", name, "--data_preset", preset, *extra,
               "--out_dir", str(out_dir)]  # fmt: skip
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    if subprocess.run(command).returncode != 0:
        raise common.UserError(f"{name} failed (its output is above); rerun the same command to resume it")
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def time_to(target, curve):
    """(step, seconds) of the first validation at or below target, or None if the run never got there."""
    return next(((step, seconds) for step, seconds, error in curve if error <= target), None)


def study_table(runs, target):
    lines = [f"target: validation relative L2 error {target:.4f} (the first config's final error, plus 10 %)", "",
             f"{'config':<12}{'global batch':>13}{'epochs':>8}{'steps':>7}{'peak lr':>10}{'final error':>13}"
             f"{'wall time':>11}{'samples/s':>11}{'to target':>22}"]  # fmt: skip
    for name, run_dir in runs:
        s = common.read_summary(run_dir)
        reached = time_to(target, common.scalar_curve(run_dir, "val/relative_l2"))
        to_target = f"step {reached[0]}, {reached[1]:.0f} s" if reached else "not reached"
        lines.append(f"{name:<12}{s['settings']['global_batch_size']:>13}{s['settings']['num_epochs']:>8}"
                     f"{s['steps']:>7}{s['peak_lr']:>10.2e}{s['val_relative_l2']:>13.4f}{s['wall_time_s']:>9.0f} s"
                     f"{s['samples_per_s']:>11.0f}{to_target:>22}")  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", default="small", help="data preset of every run (default: small)")
    parser.add_argument("--configs", nargs="*", default=BATCH_CONFIGS, help=f"default: {' '.join(BATCH_CONFIGS)}")
    parser.add_argument("--out_dir", help="default: runs/07_large_batch/study-<preset> (or under $SCRATCH)")
    parser.add_argument("--nproc_per_node", type=int, help="processes per run (default: the GPUs, or 1 on a CPU)")
    args, extra = parser.parse_known_args()  # anything else goes to every train.py: --num_workers 8
    unknown = [name for name in args.configs if name not in BATCH_CONFIGS]
    if unknown:
        raise common.UserError(f"--configs {' '.join(unknown)}: not a batch config; choose from "
                               f"{' '.join(BATCH_CONFIGS)}")  # fmt: skip
    for name in args.configs:  # every run's settings are checked before the first starts
        common.load_config(STAGE / "config.yaml", ["--config", name, "--data_preset", args.preset, *extra])
    nproc = args.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    study_dir = common.run_dir(STAGE.name, f"study-{args.preset}", args.out_dir)

    runs = [(name, study_dir / name) for name in args.configs]
    for name, run_dir in runs:
        if (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists():
            print(f"=== {name}: finished already in {run_dir}")
        else:
            run_config(name, args.preset, run_dir, nproc, extra)

    target = 1.1 * common.read_summary(runs[0][1])["val_relative_l2"]
    table = study_table(runs, target)
    (study_dir / "study.txt").write_text(table + "\n")
    (study_dir / "study.json").write_text(json.dumps({"configs": args.configs, "target": target}, indent=2) + "\n")
    # A reference study (in example_logs/) draws the README's figure; any other, a figure beside its runs.
    in_example_logs = study_dir.resolve().parent == make_figures.REPO / "example_logs"
    figure = make_figures.IMAGES / f"{study_dir.name}.png" if in_example_logs else study_dir / "study.png"
    make_figures.batch_size_study(study_dir, figure)
    print(f"\nThe batch-size study on preset {args.preset!r} ({study_dir}):\n\n{table}\n\nfigure: {figure}")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
