"""Checkpoint-restart (stage 03 and every later stage): an interrupted and resumed run ends bit-identical."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from helpers import REPO, output_of, run_python

# Every stage that checkpoints joins these tests by adding its name here.
RESUME_STAGES = [REPO / "stages" / name for name in ["03_checkpoint_restart"]]
IDS = [stage.name for stage in RESUME_STAGES]
INTERRUPTIONS = {"mid-epoch": 5, "epoch boundary": 16, "late": 27}  # the quick config runs 32 steps


def train(stage, out_dir, data_root, *extra):
    return run_python(stage / "train.py", "--config", "quick", "--out_dir", out_dir, "--data_root", data_root,
                      *extra, cwd=out_dir.parent)  # fmt: skip


def final_weights(out_dir):
    newest = sorted((out_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    """The final weights of an uninterrupted quick run, per stage."""
    weights = {}
    for stage in RESUME_STAGES:
        out_dir = tmp_path_factory.mktemp(stage.name) / "run"
        result = train(stage, out_dir, tiny_data)
        assert result.returncode == 0, output_of(result)
        weights[stage.name] = final_weights(out_dir)
    return weights


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
@pytest.mark.parametrize("where", INTERRUPTIONS)
def test_resumed_run_ends_bit_identical(stage, where, tmp_path, tiny_data, uninterrupted):
    out_dir = tmp_path / "run"
    stopped = train(stage, out_dir, tiny_data, "--signal_at_step", INTERRUPTIONS[where])
    assert stopped.returncode == 3, output_of(stopped)
    assert "SIGUSR1 received: saved" in stopped.stdout
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0, output_of(resumed)
    assert f"step {INTERRUPTIONS[where]}" in resumed.stdout.split("resuming from")[1].splitlines()[0]
    assert_same_weights(final_weights(out_dir), uninterrupted[stage.name])


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
@pytest.mark.parametrize(("after_step", "delay"), [(8, 0.02), (16, 0.15)])
def test_sigkill_at_any_moment_then_resume(stage, after_step, delay, tmp_path, tiny_data, uninterrupted):
    """SIGKILL gives no chance to save: whatever moment it strikes, the resumed run completes the same."""
    out_dir = tmp_path / "run"
    newest = kill_and_resume(stage, out_dir, tiny_data, after_step, delay)
    assert newest != "step-00000032.pt", "the kill came after the run had finished: it tested nothing"
    assert_same_weights(final_weights(out_dir), uninterrupted[stage.name])


def interrupt(stage, out_dir, data_root, after_step, delay, signal_number):
    """Start a quick run and send it a signal `delay` seconds after it logs step `after_step`.
    Returns its exit code and the rest of its output."""
    command = [sys.executable, stage / "train.py", "--config", "quick", "--out_dir", out_dir, "--data_root", data_root]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each log line reaches us when it is written
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in process.stdout:
        if f"step {after_step}/" in line:
            break
    time.sleep(delay)
    process.send_signal(signal_number)
    rest = process.stdout.read()
    return process.wait(), rest


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_sigterm_saves_and_the_next_run_resumes(stage, tmp_path, tiny_data, uninterrupted):
    """Preemption and scancel send SIGTERM: the run saves at the next step and exits; a rerun resumes."""
    out_dir = tmp_path / "run"
    code, output = interrupt(stage, out_dir, tiny_data, 8, 0.0, signal.SIGTERM)
    assert code == 3 and "SIGTERM received: saved" in output, output
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, output_of(resumed)
    assert_same_weights(final_weights(out_dir), uninterrupted[stage.name])


def kill_and_resume(stage, out_dir, data_root, after_step, delay):
    """SIGKILL a quick run `delay` seconds after it logs step `after_step`, then resume it.
    Returns the newest checkpoint on disk at the moment of the kill."""
    interrupt(stage, out_dir, data_root, after_step, delay, signal.SIGKILL)
    on_disk = sorted((out_dir / "checkpoints").glob("step-*.pt"))
    resumed = train(stage, out_dir, data_root)
    assert resumed.returncode == 0, output_of(resumed)
    assert "cannot be read" not in resumed.stdout, "a checkpoint on disk was corrupt: the save is not atomic"
    return on_disk[-1].name if on_disk else "no checkpoint yet"


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(stage, tmp_path, tiny_data, uninterrupted):
    out_dir = tmp_path / "run"
    assert train(stage, out_dir, tiny_data, "--signal_at_step", 10).returncode == 3
    newest = sorted((out_dir / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:5000])
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0, output_of(resumed)
    assert f"checkpoint {newest} cannot be read" in resumed.stdout and "step 8" in resumed.stdout
    assert_same_weights(final_weights(out_dir), uninterrupted[stage.name])


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_checkpoint_of_another_model_is_refused(stage, tmp_path, tiny_data):
    out_dir = tmp_path / "run"
    assert train(stage, out_dir, tiny_data, "--signal_at_step", 4).returncode == 3
    result = train(stage, out_dir, tiny_data, "--base_channels", 16)
    assert result.returncode != 0 and "Traceback" not in result.stderr, output_of(result)
    assert "'base_channels': 8" in result.stderr and "--resume none" in result.stderr


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_checkpoint_folder_that_cannot_be_written(stage, tmp_path, tiny_data):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "checkpoints").write_text("a file where the folder should be")
    result = train(stage, out_dir, tiny_data)
    assert result.returncode != 0 and "Traceback" not in result.stderr, output_of(result)
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot write checkpoints")


def load_stage(stage):
    spec = importlib.util.spec_from_file_location(f"predict_{stage.name}", stage / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
@pytest.mark.parametrize("wrapper", ["ddp", "compiled", "plain"])
def test_load_weights_into_a_plain_model(stage, wrapper, tmp_path):
    torch.manual_seed(0)
    saved = common.UNet(8, 3)
    prefix = {"ddp": "module.", "compiled": "_orig_mod.", "plain": ""}[wrapper]
    torch.save({"model": {prefix + k: v for k, v in saved.state_dict().items()}}, tmp_path / "c.pt")
    loaded = load_stage(stage).load_weights_for_inference(common.UNet(8, 3), tmp_path / "c.pt")
    assert_same_weights(loaded.state_dict(), saved.state_dict())


@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_predict_scores_the_best_checkpoint(stage, tmp_path, tiny_data):
    out_dir = tmp_path / "run"
    assert train(stage, out_dir, tiny_data).returncode == 0
    summary = common.read_summary(out_dir)
    result = run_python(stage / "predict.py", out_dir / "checkpoints" / "best.pt", "--data_root", tiny_data,
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, output_of(result)
    assert f"validation relative L2 error {summary['val_relative_l2']:.3f}" in result.stdout
