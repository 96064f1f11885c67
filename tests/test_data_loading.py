"""Stage 04's loader: worker processes change how fast batches come, never what is in them; too many are refused,
and one that dies ends the run with one line."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import common
from helpers import REPO, SCRIPT_STAGES, finish, output_of, read_until, run_python, stage_module, start

STAGE = REPO / "stages" / "04_data_loading"


def delivered_samples(data_root, workers, epochs=2):
    """{(epoch, index): (delta, phi)} of every sample that stage 04's training loader delivers, epoch by epoch
    from one loader (persistent workers when there are any), as train.py uses it."""
    arguments = ["--config", "test", "--data_root", str(data_root), "--num_workers", str(workers)]
    cfg = common.load_config(STAGE / "config.yaml", arguments)
    _, sampler, loader, _ = stage_module(STAGE, "data_loading").make_loaders(cfg, torch.device("cpu"))
    assert loader.persistent_workers == (workers > 0)
    samples = {}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = [index for _, index in sampler]
        for number, (delta, phi) in enumerate(loader):
            for k in range(len(delta)):
                samples[(epoch, order[number * cfg.batch_size + k])] = (delta[k], phi[k])
    return samples


def test_workers_change_nothing_in_the_batches(tiny_data):
    """The same samples with the same transforms, with 0, 2 or 4 workers and in two runs with the same seed."""
    reference = delivered_samples(tiny_data, 0)
    for workers in (0, 2, 4):
        samples = delivered_samples(tiny_data, workers)
        assert samples.keys() == reference.keys()
        different = [key for key in samples if not all(map(torch.equal, samples[key], reference[key]))]
        assert not different, f"{workers} workers: {len(different)} samples differ, e.g. {different[:3]}"


def test_persistent_workers_draw_new_transforms_every_epoch(tiny_data):
    """Workers keep their own copy of the Dataset: unless the epoch travels with each index, every epoch would
    repeat epoch 0's rotations, flips and shifts. (Distinct worker seeds prove nothing here: PyTorch gives
    each worker its own seed anyway.)"""
    samples = delivered_samples(tiny_data, 2)
    indices = {index for epoch, index in samples if epoch == 0} & {index for epoch, index in samples if epoch == 1}
    same = [i for i in indices if torch.equal(samples[(0, i)][0], samples[(1, i)][0])]
    assert len(indices) > 400
    assert len(same) < len(indices) / 10, f"{len(same)} of {len(indices)} samples got epoch 0's transform again"


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_benchmark_runs_and_prints_its_table(workers, tiny_data, tmp_path):
    arguments = ["--data_preset", "tiny", "--data_root", tiny_data, "--workers", workers, "--batches", 8, "--warmup", 2]
    result = run_python(STAGE / "bench_loader.py", *arguments, "--batch_size", 32, cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    print(result.stdout)
    row = result.stdout.strip().splitlines()[-1].split()
    assert int(row[0]) == workers and float(row[1]) > 0 and float(row[2]) > 0, result.stdout


LOADER_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "data_loading.py").exists()]  # 04 on


@pytest.mark.parametrize("stage", LOADER_STAGES, ids=[stage.name for stage in LOADER_STAGES])
def test_more_workers_than_the_machine_can_run_are_refused(stage):
    """--num_workers 1000 started about 1300 processes and took 17 GB: more than 4 per CPU is refused, saying why."""
    data_loading = stage_module(stage, "data_loading")
    cpus = len(os.sched_getaffinity(0))
    assert data_loading.worker_count(4 * cpus) == 4 * cpus
    with pytest.raises(common.UserError, match=f"--num_workers {4 * cpus + 1}: this process may use {cpus} CPU"):
        data_loading.worker_count(4 * cpus + 1)


KILL_STAGES = [LOADER_STAGES[0], LOADER_STAGES[-1]]  # data_loading.py's copies are checked by tests/test_docs.py


@pytest.mark.parametrize("stage", KILL_STAGES, ids=[stage.name for stage in KILL_STAGES])
def test_a_killed_worker_ends_the_run_with_one_line_and_the_same_command_resumes(stage, tmp_path, tiny_data):
    """SIGKILL to one DataLoader worker (as the kernel's out-of-memory killer would): one line that names the worker
    and says that the same command resumes, no traceback; then that command resumes from the last checkpoint."""
    arguments = [stage / "train.py", "--config", "test", "--out_dir", tmp_path / "run",
                 "--data_root", tiny_data]  # fmt: skip
    process = start([sys.executable, *arguments], env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    read_until(process, "step 8/")
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), signal.SIGKILL)
    stdout, stderr = finish(process)
    last_line = stderr.strip().splitlines()[-1]
    assert process.returncode == 1 and "Traceback" not in stderr, stderr
    # By when it noticed, PyTorch says "DataLoader worker (pid N) is killed by signal: Killed" or "(pid(s) N) exited
    # unexpectedly", or the connection to the worker breaks while a batch is received from it
    assert last_line.startswith("error: ") and "a DataLoader worker process ended before training did" in last_line
    assert workers[0] in last_line or "while receiving a batch" in last_line, last_line
    assert "run the same command to resume" in last_line
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    resumed = run_python(*arguments, cwd=tmp_path)
    assert resumed.returncode == 0 and f"resuming from {saved}" in resumed.stdout, output_of(resumed)
