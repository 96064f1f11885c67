"""Stage 10: every case of the clinic shows the symptom the README shows; the slow-step limit by hand; the stacks on
demand and the time-limit signal during a hang on the local Slurm."""

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, output_of, run_python, stage_module
from slurm_fixture import job_field, submit, wait_for_job

STAGE = REPO / "stages" / "10_diagnose"
CLINIC = STAGE / "clinic.py"


def signalled_dumps(text):
    """How many times a rank wrote its stacks on USR2, not through its watchdog: every dump lists the main thread once
    (the thread whose outermost frame is train.py's `<module>`; whichever thread the signal interrupted is "Current
    thread"), and the watchdog heads each of its own with a line "--- <time>: <what> is slow ---"."""
    lines, main_threads = text.splitlines(), 0
    for index, line in enumerate(lines):
        if line.startswith(("Thread 0x", "Current thread 0x")):
            frames = list(itertools.takewhile(lambda frame: frame.startswith("  File "), lines[index + 1 :]))
            main_threads += bool(frames) and frames[-1].endswith("in <module>")
    return main_threads - text.count(" is slow ---")


def clinic(case, tmp_path):
    result = run_python(CLINIC, case, "--out_dir", tmp_path / case, cwd=tmp_path, timeout=300)
    print(result.stdout)
    return result


def test_the_slow_step_limit_worked_by_hand():
    diagnose = stage_module(STAGE, "diagnose")
    assert diagnose.slow_step_limit([0.01, 0.02, 0.03], timeout_s=300) == 5.0  # the floor: 20 x 0.02 s is 0.4 s
    assert diagnose.slow_step_limit([1.0, 2.0, 9.0], timeout_s=300) == 40.0  # 20 x the median, 2 s
    assert diagnose.slow_step_limit([1.0, 2.0, 9.0], timeout_s=60) == 20.0  # a third of the timeout
    assert diagnose.slow_step_limit([0.01] * 3, timeout_s=6) == 2.0  # below the floor: the timeout comes first


def test_a_stopped_rank_is_reported_before_the_timeout_with_every_ranks_stacks_and_the_run_goes_on(tmp_path):
    """kill -STOP rank 1: rank 0 waits in a collective; its watchdog warns (5 s: the floor, a third of the clinic's
    15 s timeout) and names where it waits; USR2 makes rank 0 write its stacks while it waits; rank 1, stopped,
    writes its own once continued (kill -CONT), and the run ends as it would have."""
    result = clinic("stopped-rank", tmp_path)
    assert result.returncode == 0, output_of(result)
    warning = re.search(r"rank 0: (step \d+|the checkpoint of step \d+|the validation after step \d+) has taken "
                        r"([\d.]+) s \(the recent steps: [\d.]+ s\); it waits in (.*); flight recorder: collective "
                        r"#(\d+) entered \(gloo:", result.stdout)  # fmt: skip
    assert warning and 5 <= float(warning.group(2)) < 15, output_of(result)
    assert any(name in warning.group(3) for name in ("backward", "all_reduce", "barrier")), warning.group(3)
    assert "its state is 'T" in result.stdout and "done in" in result.stdout
    at_once = re.search(r"rank 0 \(waiting in a collective\) wrote (\d+) lines of stacks, rank 1 (\d+)", result.stdout)
    assert at_once and int(at_once.group(1)) > 10 and at_once.group(2) == "0", output_of(result)
    stacks = {rank: (tmp_path / "stopped-rank" / "stacks" / f"rank{rank}.txt").read_text() for rank in (0, 1)}
    assert all(signalled_dumps(text) for text in stacks.values()), "every rank wrote its stacks on USR2"
    assert "is slow ---" in stacks[0], "the watchdog's stacks too"


def test_a_killed_rank_ends_the_run_at_once_and_torchrun_names_it(tmp_path):
    start = time.monotonic()
    result = clinic("killed-rank", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    assert "error: another process of this run died or stopped answering" in result.stdout
    root_cause = result.stdout.split("Root Cause (first observed failure):", 1)[1]
    assert "exitcode  : -9" in root_cause and "Signal 9 (SIGKILL)" in root_cause
    assert time.monotonic() - start < 120


def test_a_killed_dataloader_worker_is_named_in_one_line(tmp_path):
    result = clinic("killed-worker", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    assert "a DataLoader worker process ended before training did" in result.stdout


def test_a_nan_in_one_ranks_data_is_found_in_the_data(tmp_path):
    result = clinic("nan-in-data", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    assert "the data hold a value that is not a finite number (train.npy, sample 123, field delta" in result.stdout


def test_a_port_in_use_is_named_with_what_to_do(tmp_path):
    result = clinic("port-in-use", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    assert re.search(r"error: rank 0 cannot listen on port \d+ of 127\.0\.0\.1: another program uses it", result.stdout)


def test_ranks_with_different_settings_are_refused(tmp_path):
    result = clinic("different-settings", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    assert "rank 1 would train another run than rank 0 (base_lr" in result.stdout


def test_a_skipped_collective_is_named_with_torch_distributed_debug_detail(tmp_path):
    result = clinic("skipped-collective", tmp_path)
    without, detail = result.stdout.split("with TORCH_DISTRIBUTED_DEBUG=DETAIL", 1)
    assert "Detected mismatch" not in without and "exit code 0" not in without.split("---")[1], output_of(result)
    assert "Detected mismatch between collectives on ranks" in detail
    assert "Tensor shapes: 1000vs 1" in detail or "Tensor shapes: 1vs 1000" in detail  # either rank may say it first


def test_an_exception_on_one_rank_is_the_root_cause_torchrun_names(tmp_path):
    result = clinic("exception-on-one-rank", tmp_path)
    assert "exit code 1" in result.stdout, output_of(result)
    root_cause = result.stdout.split("Root Cause (first observed failure):", 1)[1]
    assert "ValueError: rank 1: a sample it cannot read (say)" in root_cause and "rank      : 1" in root_cause


def test_the_clinic_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_python(CLINIC, "killed-rank", "--out_dir", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not empty: give a new folder (the clinic breaks runs on purpose)"]
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def slurm_env(local_slurm, **extra):
    return {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}", **extra}


def submit_and_wait_for(env, out_dir, arguments, step):
    job_id = submit(env, "-A", "tutorial", f"--chdir={REPO}", STAGE.relative_to(REPO) / "submit_pm.sh",
                    *map(str, arguments), "--out_dir", str(out_dir))  # fmt: skip
    log, deadline = out_dir / "train.log", time.monotonic() + 180
    while not (log.exists() and f"step {step}/" in log.read_text()):
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)
    return job_id


def job_output(job_id):
    path = REPO / f"slurm-{STAGE.name}-{job_id}.out"
    text = path.read_text()
    path.unlink()
    return text


def test_stacks_on_demand_under_srun_with_scancel_full_and_the_job_completes(local_slurm, tmp_path, tiny_data):
    """`scancel --signal=USR2 --full <job>`: the batch shell (which survives it), srun and its 4 tasks get it; each
    rank writes its stacks, and the job goes on to COMPLETED, with no slow-step warning on the way."""
    env = slurm_env(local_slurm)
    out_dir = tmp_path / "run"
    job_id = submit_and_wait_for(env, out_dir, ["--config", "test", "--num_epochs", "20", "--data_root", tiny_data], 16)
    subprocess.run(["scancel", "--signal=USR2", "--full", job_id], env=env, check=True)
    state = wait_for_job(env, job_id, timeout=240)
    output = job_output(job_id)
    assert state == "COMPLETED", output
    assert "USR2: every rank writes its stacks" in output and "done in" in output
    assert "has taken" not in output, "no slow step in a normal run"
    for rank in range(4):
        text = (out_dir / "stacks" / f"rank{rank}.txt").read_text()
        assert text.startswith(f"rank {rank}, pid") and "in <module>" in text, f"rank {rank}:\n{text}"


def test_a_time_limit_signal_while_a_rank_hangs_requeues_within_the_grace_and_resumes(local_slurm, tmp_path,
                                                                                      tiny_data):  # fmt: skip
    """Rank 1 stopped (kill -STOP), then the time-limit signal: the other ranks cannot agree to stop, so the batch
    shell waits TUTORIAL_STOP_GRACE_S (10 s here, 90 by default), asks for the stacks, and requeues the job; the
    requeued job resumes from the last checkpoint and completes."""
    env = slurm_env(local_slurm, TUTORIAL_STOP_GRACE_S="10")
    out_dir = tmp_path / "run"
    job_id = submit_and_wait_for(env, out_dir, ["--config", "test", "--num_epochs", "6", "--data_root", tiny_data], 16)
    while not (out_dir / "checkpoints" / "step-00000016.pt").exists():  # written after the step's log line
        time.sleep(0.1)
    rank_1 = int(re.search(r"pid (\d+)", (out_dir / "stacks" / "rank1.txt").read_text()).group(1))
    os.kill(rank_1, 19)  # SIGSTOP
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    signalled = time.monotonic()
    while job_field(env, job_id, "Restarts") == "0":
        assert time.monotonic() - signalled < 60, "not requeued within the grace"
        time.sleep(0.5)
    state = wait_for_job(env, job_id, timeout=240)
    output = job_output(job_id)
    assert state == "COMPLETED", output
    assert "train.py did not stop within 10 s: a rank hangs" in output and "restart 1" in output, output
    resumed = re.search(r"resuming from .*step-0*(\d+)\.pt", output)
    assert resumed and int(resumed.group(1)) >= 16, output
    assert signalled_dumps((out_dir / "stacks" / "rank0.txt").read_text()), "rank 0's stacks, asked before requeue"
