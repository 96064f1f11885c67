"""The tour runs every stage in its `quick` config and prints one table with a row for each; every `quick`
run beats the physics baseline (the first table a learner sees must not say the network loses to it)."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common
from helpers import REPO, SCRIPT_STAGES, STAGES, output_of, run_python


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """`python stages/run_all.py`, as the Quick start says: its output and its folder."""
    folder = tmp_path_factory.mktemp("tour")
    result = run_python(REPO / "stages" / "run_all.py", "--out_dir", folder / "tour", cwd=folder, timeout=900)
    assert result.returncode == 0, output_of(result)
    return result.stdout, folder / "tour"


@pytest.mark.xdist_group("tour")  # with pytest-xdist: one worker runs the tour, once, for these tests
def test_tour_runs_every_stage_and_each_beats_the_baseline(tour):
    output, folder = tour
    table = output.split("The tour, config 'quick'")[1]
    print(table)
    assert "samples/s" in table and "rel. L2 (baseline)" in table and "beats baseline" in table
    for stage in STAGES:
        row = next(line for line in table.splitlines() if line.startswith(stage.name))
        assert "failed" not in row and "CPU" in row, row
        assert row.split()[6] == "yes", f"{stage.name}'s quick run does not beat the physics baseline: {row}"
        assert (folder / stage.name / "summary.json").exists()


@pytest.mark.xdist_group("tour")
@pytest.mark.parametrize("stage", [s for s in STAGES if (s / "distributed.py").exists()], ids=lambda s: s.name)
def test_tour_runs_data_parallel_stages_with_two_processes_and_only_rank_0_writes(stage, tour):
    """The tour runs `torchrun --standalone --nproc_per_node 2 stages/06_ddp/train.py --config quick` (gloo)."""
    output, folder = tour
    summary = common.read_summary(folder / stage.name)
    assert summary["world_size"] == 2 and summary["device"] == "cpu"
    run = folder / stage.name
    wandb = ["wandb"] if (stage / "tracking.py").exists() else []  # stage 08 on: W&B's files, offline here
    stacks = ["stacks"] if (stage / "diagnose.py").exists() else []  # stage 10 on: each rank's file, where it writes
    assert sorted(path.name for path in run.iterdir()) == [".lock", "checkpoints", *stacks, "summary.json",
                                                          "tensorboard", "train.log", *wandb]  # fmt: skip
    if stacks:  # every rank, and nothing else
        assert sorted(path.name for path in (run / "stacks").iterdir()) == ["rank0.txt", "rank1.txt"]
    assert len(list((run / "tensorboard").iterdir())) == 1, "one event file: rank 0's"
    log = (run / "train.log").read_text()
    assert log.count("done in") == 1 and log.count("first step:") == 1, "rank 0 alone logs"
    assert "2 process(es), launcher torchrun: 16 samples of each batch of 32 per process" in log
    section = output.split(f"=== {stage.name} (quick) ===")[1].split("===")[0]
    assert section.count("done in") == 1, "rank 0 alone prints"


@pytest.mark.xdist_group("tour")
@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=lambda stage: stage.name)
def test_each_stage_ran_from_another_folder_and_wrote_its_log_events_and_summary(stage, tour):
    """The tour starts each train.py from its own working folder (not the repository), as a user may."""
    _, folder = tour
    out_dir = folder / stage.name
    summary = common.read_summary(out_dir)
    assert summary["stage"] == stage.name and summary["settings"]["config"] == "quick"
    for key in ("final_train_loss", "final_val_loss", "val_relative_l2", "samples_per_s", "wall_time_s"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert 0 <= summary["data_wait_share"] < 1
    assert summary["hardware"] and summary["torch"]
    log = (out_dir / "train.log").read_text()
    assert "samples/s | data wait" in log and "ETA" in log and "done in" in log
    events = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/relative_l2"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"], "a prediction image"
    assert events.Scalars("val/relative_l2")[-1].value == pytest.approx(summary["val_relative_l2"], rel=1e-5)
    learning_rates = [event.value for event in events.Scalars("train/lr")]
    after_peak = learning_rates[learning_rates.index(max(learning_rates)) :]
    assert after_peak == sorted(after_peak, reverse=True) and learning_rates[-1] < 1e-6  # cosine to zero


def test_stages_side_by_side_with_settings_of_their_own(tmp_path):
    """Settings after a stage's prefix go to that run, settings after `--` to every run: a comparison of
    stages on the same config in one command (stage 05's README uses it on a GPU)."""
    result = run_python(REPO / "stages" / "run_all.py", "--config", "test", "--out_dir", tmp_path / "side",
                        "--stages", "04", "05 --seed 1", "--", "--num_epochs", "1", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, output_of(result)
    table = result.stdout.split("The tour, config 'test'")[1]
    assert "first step" in table and "peak GPU memory" in table
    rows = [line.split()[0] for line in table.splitlines() if line.startswith("0")]
    assert rows == ["04_data_loading", "05_amp"], table
    assert "05_amp --seed 1 " in table
    seeded = common.read_summary(tmp_path / "side" / "05_amp_seed-1")
    assert seeded["settings"]["seed"] == 1 and seeded["steps"] == 16, "its own seed, and the shared --num_epochs 1"
    assert common.read_summary(tmp_path / "side" / "04_data_loading")["settings"]["seed"] == 0


@pytest.mark.parametrize(("stages", "message"), [
    (["0"], "--stages '0': '0' names"),
    (["01 --seed 1"], "01_notebook is a notebook: settings go to the script stages only"),
])  # fmt: skip
def test_stages_that_cannot_run_side_by_side_are_refused(stages, message, tmp_path):
    result = run_python(REPO / "stages" / "run_all.py", "--stages", *stages, "--out_dir", tmp_path, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, output_of(result)
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, output_of(result)
