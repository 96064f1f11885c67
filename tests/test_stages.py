"""Every stage's `quick` config, started as a user starts it, and its answers to bad input."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import SCRIPT_STAGES, output_of, run_python

IDS = [stage.name for stage in SCRIPT_STAGES]


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
def test_quick_config_runs_from_another_folder(stage, tmp_path):
    out_dir, data_root = tmp_path / "run", tmp_path / "data"
    result = run_python(
        stage / "train.py", "--config", "quick", "--out_dir", out_dir, "--data_root", data_root, cwd=tmp_path
    )
    assert result.returncode == 0, output_of(result)
    assert "not found" in result.stdout and "generating it now" in result.stdout  # it says it makes the data

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stage"] == stage.name and summary["settings"]["config"] == "quick"
    for key in ("final_train_loss", "final_val_loss", "val_relative_l2", "samples_per_s", "wall_time_s"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert 0 <= summary["data_wait_share"] < 1
    assert summary["val_relative_l2"] < 1.0, "even the quick config beats predicting zero"
    assert summary["hardware"] and summary["torch"]

    log = (out_dir / "train.log").read_text()
    assert "samples/s | data wait" in log and "ETA" in log and "done in" in log

    events = EventAccumulator(str(out_dir / "tensorboard")).Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/relative_l2"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"], "a prediction image"
    last_error = events.Scalars("val/relative_l2")[-1].value
    assert last_error == pytest.approx(summary["val_relative_l2"], rel=1e-5)
    learning_rates = [e.value for e in events.Scalars("train/lr")]
    assert learning_rates == sorted(learning_rates, reverse=True) and learning_rates[-1] < 1e-6  # cosine to zero


def expect_one_line_error(result, *fragments):
    assert result.returncode != 0, output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: "), output_of(result)
    for fragment in fragments:
        assert fragment in last_line, output_of(result)


BAD_ARGUMENTS = {
    "unknown config": (["--config", "fastest"], ["unknown config 'fastest'", "quick"]),
    "unknown key": (["--learning_rate", "0.1"], ["unknown option '--learning_rate'", "--lr"]),
    "wrong type": (["--batch_size", "many"], ["--batch_size expects a int"]),
    "unknown preset": (["--config", "quick", "--data_preset", "huge"], ["unknown data preset 'huge'", "tiny"]),
}


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments(stage, case, tmp_path, tiny_data):
    arguments, fragments = BAD_ARGUMENTS[case]
    result = run_python(stage / "train.py", *arguments, "--data_root", tiny_data, "--out_dir", tmp_path, cwd=tmp_path)
    expect_one_line_error(result, *fragments)


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
def test_output_folder_that_cannot_be_written(stage, tmp_path, tiny_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_python(
        stage / "train.py", "--config", "quick", "--data_root", tiny_data, "--out_dir", blocker / "run", cwd=tmp_path
    )
    expect_one_line_error(result, "cannot write to", "--out_dir")


def copy_of_tiny_data(tiny_data, tmp_path):
    """A data root of our own with the tiny preset in it, to damage without harming the shared one."""
    data_root = tmp_path / "data"
    (data_root / "tiny").mkdir(parents=True)
    for name in ("train.npy", "val.npy", "meta.json"):
        (data_root / "tiny" / name).write_bytes((tiny_data / "tiny" / name).read_bytes())
    return data_root


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
def test_corrupt_data_file(stage, tmp_path, tiny_data):
    data_root = copy_of_tiny_data(tiny_data, tmp_path)
    truncated = (tiny_data / "tiny" / "train.npy").read_bytes()[:10_000]
    (data_root / "tiny" / "train.npy").write_bytes(truncated)
    result = run_python(stage / "train.py", "--config", "quick", "--data_root", data_root, "--out_dir", tmp_path / "r",
                        cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "corrupt", "python data/generate.py --preset tiny")


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
def test_data_of_another_seed_is_refused(stage, tmp_path, tiny_data):
    data_root = copy_of_tiny_data(tiny_data, tmp_path)
    meta = json.loads((tiny_data / "tiny" / "meta.json").read_text())
    (data_root / "tiny" / "meta.json").write_text(json.dumps({**meta, "seed": 7}))
    result = run_python(stage / "train.py", "--config", "quick", "--data_root", data_root, "--out_dir", tmp_path / "r",
                        cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "seed 7")
    assert np.load(data_root / "tiny" / "train.npy").shape[0] == meta["n_train"], "the data were left alone"
