"""Make the figures the READMEs show, from the reference runs in example_logs/ (nothing is drawn by hand).

    python tutorial_images/make_figures.py

Every figure is a function of the logs it reads; stages/07_large_batch/study.py calls batch_size_study for its own
runs too.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt

IMAGES = Path(__file__).resolve().parent
REPO = IMAGES.parent
sys.path.insert(0, str(REPO / "stages"))
import common


def batch_size_study(study_dir, path):
    """Validation error of every run of a batch-size study against optimizer steps (left) and against wall
    time (right), with the study's target error and the physics baseline."""
    study = json.loads((Path(study_dir) / "study.json").read_text())
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    hardware = None
    for name in study["configs"]:
        run_dir = Path(study_dir) / name
        summary = common.read_summary(run_dir)
        hardware = summary["hardware"]
        steps, seconds, errors = zip(*common.scalar_curve(run_dir, "val/relative_l2"))
        label = f"{name} (batch {summary['settings']['global_batch_size']}, {summary['settings']['num_epochs']} epochs)"
        by_step.plot(steps, errors, marker=".", label=label)
        by_time.plot(seconds, errors, marker=".", label=label)
    baseline = summary["baseline_relative_l2"]
    for axes, xlabel in [(by_step, "optimizer steps"), (by_time, "wall time (s)")]:
        axes.axhline(study["target"], color="grey", linestyle="--", linewidth=1)
        axes.axhline(baseline, color="black", linestyle=":", linewidth=1)
        axes.set_xlabel(xlabel)
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
    by_step.set_xscale("log")
    by_step.set_ylabel("validation relative L2 error")
    by_step.text(by_step.get_xlim()[0], study["target"], f" target {study['target']:.3f}", va="bottom", color="grey")
    by_step.text(by_step.get_xlim()[0], baseline, f" physics baseline {baseline:.3f}", va="bottom")
    by_time.legend(fontsize=8)
    figure.suptitle(f"Batch-size study, preset {summary['settings']['data_preset']!r}, on {hardware}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main():
    made = []
    for study in sorted((REPO / "example_logs").glob("*/study.json")):
        made.append(batch_size_study(study.parent, IMAGES / f"{study.parent.name}.png"))
    for path in made:
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
