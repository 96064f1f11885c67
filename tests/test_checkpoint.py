"""Checkpoint-restart (stage 03 and every later stage): an interrupted and resumed run ends bit-identical."""

import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from helpers import (
    SPY,
    STAGES,
    assert_resumed_from,
    final_state,
    final_weights,
    output_of,
    read_until,
    rng_fingerprint,
    run_python,
    saved_by_the_stop,
    setting,
    start,
)

# Every stage that checkpoints (it has a checkpoints.py) is tested for bit-exact resume after a stop signal.
# The rest is code that each stage copies unchanged (checkpoints.py and predict.py: tests/test_docs.py checks the
# copies; train.py: the README diffs show its resume code untouched): it is tested on the first of these stages
# and the newest, which keeps the suite short as stages are added.
RESUME_STAGES = [stage for stage in STAGES if (stage / "checkpoints.py").exists()]
IDS = [stage.name for stage in RESUME_STAGES]
ENDS = [RESUME_STAGES[0], RESUME_STAGES[-1]]
END_IDS = [stage.name for stage in ENDS]
INTERRUPTIONS = {"mid-epoch": 5, "epoch boundary": 16, "late": 27}  # the test config runs 32 steps


def train(stage, out_dir, data_root, *extra, env=None, **popen):
    """A run of the small `test` config, which these tests start many times."""
    return run_python(stage / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root,
                      *extra, cwd=out_dir.parent, env=env, **popen)  # fmt: skip


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# Every checkpointing stage resumes bit-exact mid-epoch; the first and the newest at every interruption point.
RESUME_CASES = [(stage, where) for stage in RESUME_STAGES for where in INTERRUPTIONS
                if stage in ENDS or where == "mid-epoch"]  # fmt: skip


@pytest.mark.parametrize(("stage", "where"), RESUME_CASES, ids=[f"{s.name}-{w}" for s, w in RESUME_CASES])
def test_resumed_run_ends_bit_identical(stage, where, tmp_path, tiny_data, stopped_run, uninterrupted_run):
    """The weights and the summary's figures of the run end as in an uninterrupted run, and the resumed run goes on
    from the random generators' states saved at the stop: torch's is the one its first loader starts from (tests/
    spy_run.py records it; each loader draws its workers' seed from it), and Python's and NumPy's, from which
    nothing draws, end as they were saved."""
    step = INTERRUPTIONS[where]
    out_dir = stopped_run(stage, step, tmp_path / "run")
    saved = out_dir / "checkpoints" / f"step-{step:08d}.pt"
    log = (out_dir / "train.log").read_text()  # the stopped run's log (it ran in the folder this is a copy of)
    assert re.search(rf"SIGUSR1 received: saved \S+/checkpoints/{saved.name} at step {step};", log), log
    at_stop = torch.load(saved, weights_only=True)["rng"]
    resumed = run_python(SPY, tmp_path / "record.json", stage / "train.py", "--config", "test", "--out_dir", out_dir,
                         "--data_root", tiny_data, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, output_of(resumed)
    assert_resumed_from(resumed.stdout, saved)
    reference = uninterrupted_run(stage)
    assert_same_weights(final_weights(out_dir), final_weights(reference))
    first_loader = json.loads((tmp_path / "record-rank0.json").read_text())["loaders"][0]
    assert first_loader["torch_rng"] == rng_fingerprint(at_stop["torch"]), "torch's generator was not restored"
    end = final_state(out_dir)["rng"]
    assert end["python"] == at_stop["python"] and torch.equal(end["numpy"][1], at_stop["numpy"][1])
    summary, reference_summary = common.read_summary(out_dir), common.read_summary(reference)
    for key in ("final_train_loss", "final_val_loss", "val_relative_l2", "steps"):
        assert summary[key] == reference_summary[key], f"{key}: {summary[key]} resumed, {reference_summary[key]} not"


# Two moments on the first stage (its README says so), the later one on the newest.
KILLS = [(ENDS[0], 8, 0.02), (ENDS[0], 16, 0.15), (ENDS[-1], 16, 0.15)]


@pytest.mark.parametrize(("stage", "after_step", "delay"), KILLS, ids=[f"{a}-{d}-{s.name}" for s, a, d in KILLS])
def test_sigkill_at_any_moment_then_resume(stage, after_step, delay, tmp_path, tiny_data, uninterrupted):
    """SIGKILL gives no chance to save: whatever moment it strikes, the resumed run completes the same."""
    out_dir = tmp_path / "run"
    newest = kill_and_resume(stage, out_dir, tiny_data, after_step, delay)
    assert newest != "step-00000032.pt", "the kill came after the run had finished: it tested nothing"
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


def interrupt(stage, out_dir, data_root, after_step, delay, signal_number):
    """Start a run and send a signal to all its processes (DataLoader workers too, as a terminal's Ctrl-C and
    Slurm do) `delay` seconds after it logs step `after_step`. Returns its exit code and the rest of its output."""
    command = [sys.executable, stage / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each log line reaches us when it is written
    process = start(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # its own process group
    read_until(process, f"step {after_step}/")
    time.sleep(delay)
    os.killpg(process.pid, signal_number)
    rest = process.stdout.read()
    assert not process.timed_out, f"still running 240 s after it started: killed\n{rest}"
    return process.wait(), rest


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_saves_and_the_next_run_resumes(stage, signal_number, tmp_path, tiny_data, uninterrupted):
    """Preemption and scancel send SIGTERM, Ctrl-C sends SIGINT: the run saves at the next step and exits;
    a rerun resumes."""
    out_dir = tmp_path / "run"
    code, output = interrupt(stage, out_dir, tiny_data, 8, 0.0, signal_number)
    assert code == 3 and f"{signal_number.name} received: saved" in output, output
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0, output_of(resumed)
    assert_resumed_from(resumed.stdout, saved_by_the_stop(output))
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


def kill_and_resume(stage, out_dir, data_root, after_step, delay):
    """SIGKILL a run `delay` seconds after it logs step `after_step`, then resume it.
    Returns the newest checkpoint on disk at the moment of the kill."""
    interrupt(stage, out_dir, data_root, after_step, delay, signal.SIGKILL)
    on_disk = sorted((out_dir / "checkpoints").glob("step-*.pt"))
    resumed = train(stage, out_dir, data_root)
    assert resumed.returncode == 0, output_of(resumed)
    assert "cannot be read" not in resumed.stdout, "a checkpoint on disk was corrupt: the save is not atomic"
    if on_disk:  # the rerun continued from the newest, not from scratch (which would end with the same weights)
        assert_resumed_from(resumed.stdout, on_disk[-1])
    return on_disk[-1].name if on_disk else "no checkpoint yet"


# Tests that resume, damage or refuse a stopped run each get a copy of one of the runs above, run once per session
# (stopped_run in tests/conftest.py): stopped at step 5 (checkpoints 4 and 5) or 27 (20, 24, 27; best.pt of 16).
EARLY, LATE = INTERRUPTIONS["mid-epoch"], INTERRUPTIONS["late"]


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(stage, tmp_path, tiny_data, stopped_run, uninterrupted):
    out_dir = stopped_run(stage, EARLY, tmp_path / "run")
    newest = sorted((out_dir / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:5000])
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0, output_of(resumed)
    assert f"checkpoint {newest} cannot be read" in resumed.stdout
    assert_resumed_from(resumed.stdout, out_dir / "checkpoints" / "step-00000004.pt")  # the one before, not scratch
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
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


def checkpoint_files(out_dir):
    """{name: bytes} of every file in the checkpoint folder, temporary files included."""
    return {path.name: path.read_bytes() for path in sorted((out_dir / "checkpoints").iterdir())}


def expect_one_line_error(result, *fragments):
    assert result.returncode not in (0, 3) and "Traceback" not in result.stderr, output_of(result)
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and all(f in last_line for f in fragments), output_of(result)


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_resume_none_starts_over_and_keeps_the_earlier_run(stage, tmp_path, tiny_data, stopped_run, uninterrupted):
    """--resume none trains from scratch; the earlier run's files move to earlier/, so a later --resume auto
    continues the new run, never the old one (whose checkpoints have higher step numbers)."""
    out_dir = stopped_run(stage, LATE, tmp_path / "run")
    old_files = checkpoint_files(out_dir)
    restarted = train(stage, out_dir, tiny_data, "--resume", "none", "--signal_at_step", 8)
    assert restarted.returncode == 3 and "resuming from" not in restarted.stdout, output_of(restarted)
    [earlier] = (out_dir / "earlier").iterdir()
    assert checkpoint_files(earlier) == old_files, "the earlier run's checkpoints were moved, unchanged"
    assert f"moved the earlier run's files to {earlier}" in restarted.stdout
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0 and "step-00000008.pt: epoch 1, step 8" in resumed.stdout, output_of(resumed)
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
@pytest.mark.parametrize("earlier", ["finished", "interrupted"])
def test_resume_with_other_settings_is_refused(stage, earlier, tmp_path, tiny_data, stopped_run, uninterrupted_run):
    """A rerun with another learning rate, batch or model must not print the old result, nor continue the old run
    with the new settings: it stops, names the differences and the two ways out, and leaves every file as it was.
    (A new --out_dir for the new experiment is what every other test here does.)"""
    if earlier == "finished":
        out_dir = shutil.copytree(uninterrupted_run(stage), tmp_path / "run")
    else:
        out_dir = stopped_run(stage, EARLY, tmp_path / "run")
    files = checkpoint_files(out_dir)
    summary = (out_dir / "summary.json").read_bytes() if earlier == "finished" else None
    lr, batch = setting(stage, "lr"), setting(stage, "batch_size")
    result = train(stage, out_dir, tiny_data, f"--{lr}", "1e-3", f"--{batch}", "16", "--base_channels", "16")
    expect_one_line_error(result, f"{lr} 0.002 there, 0.001 now", f"{batch} 32 there, 16 now",
                          "base_channels 8 there, 16 now", "--out_dir", "--resume none")  # fmt: skip
    assert checkpoint_files(out_dir) == files
    if summary:
        assert (out_dir / "summary.json").read_bytes() == summary


def limit_file_size():
    """In the child: no file may grow beyond 200 kB, as if the disk were full. (A checkpoint of the test
    config is about 370 kB; the log and TensorBoard files stay far below.)"""
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_full_disk_during_a_checkpoint_loses_nothing(stage, tmp_path, tiny_data, stopped_run, uninterrupted):
    out_dir = stopped_run(stage, EARLY, tmp_path / "run")
    saved = checkpoint_files(out_dir)
    full = train(stage, out_dir, tiny_data, preexec_fn=limit_file_size)
    expect_one_line_error(full, "cannot write", "step-00000008.pt", "free some space")
    assert checkpoint_files(out_dir) == saved, "no temporary file left behind, the saved checkpoints untouched"
    resumed = train(stage, out_dir, tiny_data)
    assert_resumed_from(resumed.stdout, out_dir / "checkpoints" / "step-00000005.pt")
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_summary_of_a_resumed_run_describes_the_whole_run(stage, tmp_path, tiny_data):
    """Stopped at the very last step, the second process trains nothing: the figures must still cover the run.
    (It also resumes with another number of CPU threads, which makes bit-exact resume impossible: it warns.)"""
    out_dir = tmp_path / "run"
    first = train(stage, out_dir, tiny_data, "--signal_at_step", 32, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 3, output_of(first)
    first_part = torch.load(out_dir / "checkpoints" / "step-00000032.pt", weights_only=True)["totals"]
    resumed = train(stage, out_dir, tiny_data, "--resume", str(out_dir / "checkpoints" / "step-00000032.pt"),
                    env={"OMP_NUM_THREADS": "2"})  # fmt: skip
    assert resumed.returncode == 0, output_of(resumed)
    assert "2 CPU threads now, 1 before: results may differ" in resumed.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["processes"] == 2
    rate = first_part["timed_steps"] * 32 / first_part["train_time"]  # (from stage 05 on, the first step is untimed)
    assert summary["samples_per_s"] == pytest.approx(rate), "the first process's rate"
    assert summary["wall_time_s"] > first_part["wall_time"] > 0


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_resume_from_best_pt_says_what_to_use(stage, tmp_path, tiny_data, uninterrupted_run):
    best = uninterrupted_run(stage) / "checkpoints" / "best.pt"
    result = train(stage, tmp_path / "other", tiny_data, "--resume", best)
    expect_one_line_error(result, "best.pt holds no training state", "step-*.pt")


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_deterministic_mode_runs_on_a_cpu_and_changes_nothing_there(stage, tmp_path, tiny_data, uninterrupted):
    out_dir = tmp_path / "run"
    result = train(stage, out_dir, tiny_data, "--deterministic", "true")
    assert result.returncode == 0, output_of(result)
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -k cuda` on a GPU node")
@pytest.mark.parametrize("stage", RESUME_STAGES, ids=IDS)
def test_cuda_resume_is_bit_exact_with_deterministic_true(stage, tmp_path, tiny_data):
    """On a GPU, bit-exact resume needs --deterministic true (see the stage 03 README for what it costs)."""
    settings = ["--device", "cuda", "--deterministic", "true", "--num_epochs", "4"]
    whole = train(stage, tmp_path / "whole", tiny_data, *settings)
    assert whole.returncode == 0, output_of(whole)
    stopped = train(stage, tmp_path / "stopped", tiny_data, *settings, "--signal_at_step", 37)
    assert stopped.returncode == 3, output_of(stopped)
    resumed = train(stage, tmp_path / "stopped", tiny_data, *settings)
    assert resumed.returncode == 0 and "step 37" in resumed.stdout, output_of(resumed)
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "whole"))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_predict_scores_best_pt_on_the_data_it_was_trained_on(stage, tmp_path, tiny_data, uninterrupted_run):
    """predict.py reproduces the run's own validation error from best.pt, on the checkpoint's own preset ('micro'),
    not on its default ('small', which it would then generate)."""
    out_dir = uninterrupted_run(stage)
    summary = common.read_summary(out_dir)
    result = run_python(stage / "predict.py", out_dir / "checkpoints" / "best.pt", "--data_root", tiny_data,
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, output_of(result)
    assert f"error {summary['val_relative_l2']:.3f}" in result.stdout and "on preset 'micro'" in result.stdout
    assert not (tiny_data / "small").exists(), "predict.py did not fall back to another preset"


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_a_resume_from_an_older_checkpoint_starts_a_branch_and_deletes_nothing(stage, tmp_path, tiny_data,
                                                                               stopped_run, uninterrupted):  # fmt: skip
    """--resume <an older checkpoint of the folder>: the newer checkpoints (and best.pt, and the TensorBoard events
    as they were) move to earlier/<time>-branch-*/, unchanged; pruning never deletes the file resumed from, even with
    --keep_last 1; the stop line says how to resume the new branch, and the next automatic resume continues it."""
    out_dir, checkpoints = stopped_run(stage, 20, tmp_path / "run"), tmp_path / "run" / "checkpoints"
    abandoned = checkpoint_files(out_dir)  # best.pt of step 16, and the checkpoints of steps 12, 16 and 20
    older = checkpoints / "step-00000012.pt"
    branch = train(stage, out_dir, tiny_data, "--resume", older, "--keep_last", "1", "--signal_at_step", "20")
    assert branch.returncode == 3, output_of(branch)
    [aside] = (out_dir / "earlier").glob("*-branch-*")
    assert f"a new branch; the newer work moved to {aside}" in branch.stdout
    assert checkpoint_files(aside) == {name: abandoned[name] for name in ("best.pt", "step-00000016.pt",
                                                                          "step-00000020.pt")}  # fmt: skip
    assert list((aside / "tensorboard").glob("events.out.tfevents.*"))
    assert older.exists() and sorted(path.name for path in checkpoints.glob("step-*.pt")) == [
        older.name,
        "step-00000020.pt",
    ]
    assert f"to resume, run it again with --resume auto (not --resume {older})" in branch.stdout
    resumed = train(stage, out_dir, tiny_data)
    assert resumed.returncode == 0 and f"resuming from {checkpoints / 'step-00000020.pt'}: " in resumed.stdout, \
        output_of(resumed)  # fmt: skip
    assert_same_weights(final_weights(out_dir), uninterrupted(stage))


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_when_no_checkpoint_can_be_read_the_run_stops_and_names_them(stage, tmp_path, tiny_data, stopped_run):
    """Every checkpoint unreadable: one line naming them and both ways on; nothing trained, nothing changed."""
    out_dir = stopped_run(stage, LATE, tmp_path / "run")
    for path in (out_dir / "checkpoints").glob("step-*.pt"):
        path.write_bytes(path.read_bytes()[:5000])
    files = checkpoint_files(out_dir)
    result = train(stage, out_dir, tiny_data)
    expect_one_line_error(result, "no checkpoint in", "step-00000027.pt, step-00000024.pt, step-00000020.pt",
                          "--resume none", "--resume <a checkpoint>")  # fmt: skip
    assert checkpoint_files(out_dir) == files


@pytest.fixture
def tiny_copies(tiny_data):
    """copy(data_root, preset="micro"): data_root/<preset> holding a copy of the micro data's files (the test
    config's)."""

    def copy(data_root, preset="micro"):
        (data_root / preset).mkdir(parents=True)
        for path in (tiny_data / "micro").iterdir():
            (data_root / preset / path.name).write_bytes(path.read_bytes())
        return data_root / preset

    return copy


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_data_of_another_preset_or_other_data_are_refused(stage, tmp_path, tiny_data, tiny_copies, stopped_run):
    """A folder named for one preset that holds another's files is refused before training; a resume on other data
    (here: the data regenerated after a change, with another fingerprint) is refused, naming the difference."""
    mislabelled = tiny_copies(tmp_path / "mislabelled", preset="small")
    result = train(stage, tmp_path / "run1", tmp_path / "mislabelled", "--data_preset", "small")
    expect_one_line_error(result, f"{mislabelled} does not hold preset 'small'", "python data/generate.py")
    out_dir = stopped_run(stage, EARLY, tmp_path / "run2")
    other = tiny_copies(tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    original = meta["fingerprint"]
    array = np.load(other / "train.npy", mmap_mode="r+")
    array[0, 0, 0, 0] += 1.0  # another data set of the same preset, seed and sizes...
    array.flush()
    meta["fingerprint"] = common.fields.fingerprint(other)  # ...as its generator describes it
    (other / "meta.json").write_text(json.dumps(meta))
    files = checkpoint_files(out_dir)
    resumed = train(stage, out_dir, tmp_path / "other")
    expect_one_line_error(resumed, f"data fingerprint {original!r} there, {meta['fingerprint']!r} now", "--out_dir")
    assert checkpoint_files(out_dir) == files


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_a_nan_in_the_data_is_named_not_blamed_on_the_learning_rate(stage, tmp_path, tiny_copies):
    data = tiny_copies(tmp_path / "data")
    array = np.load(data / "train.npy", mmap_mode="r+")
    array[:, 0, 5, 5] = np.nan  # every training sample: the first batch meets it
    array.flush()
    result = train(stage, tmp_path / "run", tmp_path / "data")
    expect_one_line_error(result, "the data hold a value that is not a finite number", "train.npy, sample 0, "
                          "field delta", "generate them again")  # fmt: skip
    assert "smaller" not in result.stderr
