"""Make the figures the READMEs show, from the reference runs in example_logs/ and from the code (the data are
generated, the learning-rate schedules computed): nothing is drawn by hand.

    python tutorial_images/make_figures.py                   # every figure of FIGURES, into tutorial_images/
    python tutorial_images/make_figures.py --out_dir /tmp/figs   # elsewhere, to compare

Every figure is a function of what it reads; stages/07_large_batch/study.py calls batch_size_study for its own
runs too. tests/test_figures.py checks that the READMEs show exactly these figures.
"""

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt
import numpy as np
import torch

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
    return save(figure, path)


def data_samples(path, preset="small", samples=4):
    """A few validation samples of a preset, generated here: the input delta, the density rho, the target phi
    and the physics baseline (the linear solve)."""
    with tempfile.TemporaryDirectory() as root:
        val_set = common.FieldDataset(common.ensure_data(preset, root), "val")
        deltas, phis = (np.stack([val_set[i][k].numpy()[0] for i in range(samples)]) for k in (0, 1))
        baselines = common.linear_baseline(deltas, val_set.meta["phi_scale"])
    columns = {"input δ": deltas, "density ρ − 1": np.exp(deltas - 0.5) - 1, "target φ": phis,
               "baseline (linear solve)": baselines}  # fmt: skip
    figure, axes = plt.subplots(samples, len(columns), figsize=(2.2 * len(columns), 2.2 * samples))
    for column, (title, fields) in enumerate(columns.items()):
        for row in range(samples):
            axes[row, column].imshow(fields[row], cmap="RdBu_r", vmin=-3, vmax=3)
            axes[row, column].set_axis_off()
        axes[0, column].set_title(title, fontsize=10)
    figure.suptitle(f"Validation samples of the {preset!r} preset (blue < 0 < red)")
    figure.tight_layout()
    return save(figure, path)


def predictions(run_dir, path):
    """The last prediction panel a run wrote to TensorBoard: rows of input | truth | prediction | error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"images": 0}).Reload()
    last = events.Images("val/delta_truth_prediction_error")[-1]
    summary = common.read_summary(run_dir)
    figure, axes = plt.subplots(figsize=(8, 8.6))
    axes.imshow(plt.imread(io.BytesIO(last.encoded_image_string)), interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(f"{Path(run_dir).name}, step {last.step}: input | truth | prediction | error\n"
                   f"validation relative L2 error {summary['val_relative_l2']:.3f} "
                   f"(physics baseline {summary['baseline_relative_l2']:.3f}), on {summary['hardware']}")  # fmt: skip
    figure.tight_layout()
    return save(figure, path)


def lr_schedules(stage_dir, configs, path):
    """The learning rate at every optimizer step of stage 07's named configs, from its own scheduler code."""
    sys.path.insert(0, str(stage_dir))
    import batch_scaling

    figure, axes = plt.subplots(figsize=(8, 4.2))
    for name in configs:
        cfg = common.load_config(Path(stage_dir) / "config.yaml", ["--config", name])
        steps_per_epoch = common.PRESETS[cfg.data_preset]["n_train"] // cfg.global_batch_size
        total = cfg.num_epochs * steps_per_epoch
        optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=batch_scaling.peak_lr(cfg))
        scheduler = batch_scaling.make_scheduler(optimizer, cfg, steps_per_epoch)
        warmup = batch_scaling.warmup_steps(cfg, steps_per_epoch)
        rates = []
        for _ in range(total):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        axes.plot(range(1, total + 1), rates, label=f"{name}: batch {cfg.global_batch_size}, {warmup} warmup steps")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"Stage 07: square-root scaling, warmup, cosine decay ({cfg.data_preset!r} preset)")
    figure.tight_layout()
    return save(figure, path)


def quick_runs():
    """The reference runs of the `quick` config, one per stage and launch (their summaries and folders)."""
    runs = [(common.read_summary(f.parent), f.parent) for f in sorted((REPO / "example_logs").glob("*/summary.json"))]
    return [(summary, folder) for summary, folder in runs if summary["settings"]["config"] == "quick"]


def throughput(path):
    """samples/s of each stage's quick reference run, and the share of its time spent waiting for data."""
    runs = quick_runs()
    figure, axes = plt.subplots(figsize=(9, 4.2))
    names = [f"{folder.name} [{summary['settings'].get('precision', 'fp32')}]" for summary, folder in runs]
    bars = axes.barh(names, [summary["samples_per_s"] for summary, _ in runs], color="tab:blue")
    for bar, (summary, folder) in zip(bars, runs):
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" data wait {summary['data_wait_share']:.0%}, run {common.run_date(folder)}", va="center",
                  fontsize=8)  # fmt: skip
    axes.invert_yaxis()
    axes.set_xlabel("samples/s (training, all processes together)")
    hardware = sorted({summary["hardware"] for summary, _ in runs})
    axes.set_title(f"The `quick` config of each stage: CPU figures, not GPU ones\nmeasured on {' and '.join(hardware)}",
                   fontsize=10)  # fmt: skip
    axes.set_xlim(0, 1.45 * max(bar.get_width() for bar in bars))
    figure.tight_layout()
    return save(figure, path)


def loss_against_time(path):
    """Training loss against wall time of each stage's quick reference run."""
    figure, axes = plt.subplots(figsize=(8, 4.2))
    for summary, folder in quick_runs():
        steps, seconds, losses = zip(*common.scalar_curve(folder, "train/loss"))
        axes.plot(seconds, losses, marker=".",
                  label=f"{folder.name} ({summary.get('world_size', 1)} proc., {common.run_date(folder)})")  # fmt: skip
    axes.set_yscale("log")
    axes.set_xlabel("wall time since the run started (s)")
    axes.set_ylabel("training loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title("The `quick` config of each stage, on a CPU (the same data, model and steps)")
    figure.tight_layout()
    return save(figure, path)


def scaling_prediction(path):
    """samples/s against GPU count on Perlmutter as stage 09's scaling model predicts it from its assumed figures
    (scaling_model.py --perlmutter): strong scaling at global batch 64 and 256, weak scaling at 64 per GPU, each with
    its ideal line (N times one GPU), dashed; the impossible points (a per-GPU batch of 0) left out."""
    sys.path.insert(0, str(STAGE_09))
    import scaling_model

    profile_at = scaling_model.a100_profiles(scaling_model.default_gradient_bytes())
    counts = scaling_model.gpu_counts(scaling_model.PM_GPUS_PER_NODE)
    links, per_node = scaling_model.PERLMUTTER_LINKS, scaling_model.PM_GPUS_PER_NODE
    strong, weak = scaling_model.strong_scaling, scaling_model.weak_scaling
    curves = {"strong scaling, global batch 64": strong(profile_at, links, 64, counts, per_node),
              "strong scaling, global batch 256": strong(profile_at, links, 256, counts, per_node),
              "weak scaling, 64 per GPU": weak(profile_at, links, 64, counts, per_node)}  # fmt: skip
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, rows in curves.items():
        possible = [row for row in rows if row["impossible"] is None]
        gpus = [row["gpus"] for row in possible]
        line = axes.plot(gpus, [row["samples_per_s"] for row in possible], marker="o", label=label)[0]
        axes.plot(gpus, [n * possible[0]["samples_per_s"] for n in gpus], linestyle="--", color=line.get_color(),
                  linewidth=1)  # fmt: skip
    axes.plot([], [], linestyle="--", color="grey", linewidth=1, label="ideal: N times one GPU")
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(n) for n in counts])
    axes.set_yscale("log")
    axes.set_xlabel(f"GPUs ({per_node} per node)")
    axes.set_ylabel("samples/s, all GPUs together")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("A prediction from assumed figures, not a measurement: `default` on Perlmutter\n"
                   "(stages/09_scaling/scaling_model.py --perlmutter)", fontsize=10)  # fmt: skip
    figure.tight_layout()
    return save(figure, path)


def gpu_truth(folder, path):
    """samples/s of each stage's runs on one GPU (stages/gpu_truth.py), each run a dot on its mean's bar, against the
    model alone (stage 05's step on batches already on the GPU) as dashed lines."""
    truth = json.loads((folder / "truth.json").read_text())
    runs = [r for r in truth["runs"] if r["part"] in ("throughput", "lightning") and r["status"] == "ok"]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    rates = [[r["samples_per_s"] for r in runs if r["label"] == label] for label in labels]
    figure, axes = plt.subplots(figsize=(9, 4.2))
    bars = axes.barh(labels, [np.mean(each) for each in rates], color="tab:blue")
    for y, (each, label) in enumerate(zip(rates, labels)):
        axes.plot(each, [y] * len(each), "o", color="black", markersize=3)
        waits = [r["data_wait_share"] for r in runs if r["label"] == label and "data_wait_share" in r]
        said = "  data wait " + " / ".join(f"{wait:.1%}" for wait in waits) if waits else ""
        axes.text(max(each), y, said, va="center", fontsize=8)
    for r, style in zip([r for r in truth["runs"] if r["part"] == "model_alone" and r["status"] == "ok"], ("--", ":")):
        axes.axvline(r["samples_per_s"], color="tab:red", linestyle=style, label=r["label"])
    axes.invert_yaxis()
    axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("samples/s (128x128, batch 128; dots: each run)")
    axes.set_title(f"One {truth['hardware']}, commit {truth['commit'][:7]} (stages/gpu_truth.py): not Perlmutter's "
                   f"A100s", fontsize=10)  # fmt: skip
    axes.set_xlim(0, 1.3 * max(bar.get_width() for bar in bars))
    figure.tight_layout()
    return save(figure, path)


def save(figure, path):
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


STAGE_07 = REPO / "stages" / "07_large_batch"
STAGE_09 = REPO / "stages" / "09_scaling"
RUN_02 = REPO / "example_logs" / "02_script-small-cpu"
FIGURES = {  # file name -> how it is made
    "data-samples-small.png": lambda path: data_samples(path),
    "02_script-predictions-small-cpu.png": lambda path: predictions(RUN_02, path),
    "07_large_batch-lr-schedules.png": lambda path: lr_schedules(STAGE_07, ["bs64", "bs256", "bs512", "bs2048"], path),
    "throughput-quick-cpu.png": throughput,
    "loss-against-time-quick-cpu.png": loss_against_time,
    "09_scaling-prediction-perlmutter.png": scaling_prediction,
    "gpu_truth-bench-h200.png": lambda path: gpu_truth(REPO / "example_logs" / "gpu_truth-bench-h200", path),
    **{f"{study.parent.name}.png": (lambda path, folder=study.parent: batch_size_study(folder, path))
       for study in sorted((REPO / "example_logs").glob("*/study.json"))},
}  # fmt: skip


def main(folder=IMAGES):
    for name, make in FIGURES.items():
        make(Path(folder) / name)
        print(f"wrote {Path(folder) / name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Make the figures the READMEs show.", allow_abbrev=False)
    parser.add_argument("--out_dir", type=Path, default=IMAGES, help="where to write them (default: tutorial_images/)")
    main(parser.parse_args().out_dir)
