"""The submit scripts on a real (local, one-node) Slurm, with their Perlmutter flags as written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, SCRIPT_STAGES, output_of, run_python
from slurm_fixture import FINISHED, job_field, submit, wait_for_job
from test_checkpoint import assert_same_weights, final_weights

# Stage 02's script, stage 03's (which adds the requeue) and the newest stage's run on Slurm; the stages between
# copy stage 03's unchanged but for the stage's name (tests/test_docs.py checks the copies).
SUBMIT_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "submit_pm.sh").exists()]
SUBMIT_STAGES = list(dict.fromkeys(SUBMIT_STAGES[:2] + SUBMIT_STAGES[-1:]))


def sbatch_wait(env, *arguments):
    """Submit from the repository root as the READMEs say, wait, and return (exit code, job output)."""
    result = subprocess.run(["sbatch", "--parsable", "--wait", *map(str, arguments)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    job_id = result.stdout.strip().split(";")[0]
    outputs = list(REPO.glob(f"slurm-*-{job_id}.out")) if job_id else []
    text = "\n".join(path.read_text() for path in outputs)
    for path in outputs:
        path.unlink()
    return result.returncode, f"sbatch: {result.stdout}{result.stderr}\njob output:\n{text}"


@pytest.mark.parametrize("stage", SUBMIT_STAGES, ids=[s.name for s in SUBMIT_STAGES])
def test_submit_script_runs_a_stage(stage, local_slurm, tmp_path):
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    code, output = sbatch_wait(env, "-A", "tutorial", stage.relative_to(REPO) / "submit_pm.sh",
                               "--config", "test", "--out_dir", out_dir)  # fmt: skip
    assert code == 0, output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stage"] == stage.name and summary["settings"]["config"] == "test"
    assert summary["val_relative_l2"] < 1.0
    assert "environment: TUTORIAL_ENV=" in output and "done in" in output, output


def test_submit_from_elsewhere_says_where_to_submit(local_slurm, tmp_path):
    script = REPO / "stages" / "02_script" / "submit_pm.sh"
    result = subprocess.run(["sbatch", "--wait", "-o", str(tmp_path / "out.txt"), str(script)], cwd=tmp_path,
                            env=local_slurm, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "submit from the repository root" in (tmp_path / "out.txt").read_text()


def test_time_limit_signal_checkpoints_requeues_and_resumes(local_slurm, tmp_path, tiny_data):
    """Stage 03 on Slurm: the time-limit signal (sent on demand) makes the job checkpoint and requeue
    itself; the requeued job resumes and ends with the same weights as an uninterrupted run."""
    stage = REPO / "stages" / "03_checkpoint_restart"
    arguments = ["--config", "test", "--num_epochs", "8", "--data_root", tiny_data]
    reference = run_python(stage / "train.py", *arguments, "--out_dir", tmp_path / "reference", cwd=tmp_path)
    assert reference.returncode == 0, output_of(reference)

    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    job_id = submit(env, "-A", "tutorial", f"--chdir={REPO}", "stages/03_checkpoint_restart/submit_pm.sh",
                    *map(str, arguments), "--out_dir", str(out_dir))  # fmt: skip
    log = out_dir / "train.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and "step 16/" in log.read_text()):
        assert time.monotonic() < deadline and job_field(env, job_id, "JobState") not in FINISHED, "no progress"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    state = wait_for_job(env, job_id, timeout=180)
    output_file = REPO / f"slurm-03_checkpoint_restart-{job_id}.out"
    output = output_file.read_text()
    output_file.unlink()
    assert state == "COMPLETED", output
    assert job_field(env, job_id, "Restarts") == "1", output
    assert "SIGUSR1 received: saved" in output and "restart 1" in output and "resuming from" in output, output
    assert_same_weights(final_weights(out_dir), final_weights(tmp_path / "reference"))


FAKE_SRUN = """#!/bin/bash
# Stands in for `srun ... train.py`: runs until USR1, then exits with the code train.py would.
trap 'exit "$EXIT_AFTER_USR1"' USR1
echo "fake srun running"
while true; do sleep 0.05; done
"""


@pytest.mark.parametrize(("train_exit", "requeued"), [(3, True), (0, False), (1, False)])
def test_the_trap_requeues_only_a_run_that_stopped_early(train_exit, requeued, tmp_path):
    """USR1 near the time limit: requeue if train.py stopped early with a checkpoint (exit 3); if training had
    finished anyway (0) or failed (1), the job ends with that code and is not started again. Runs the batch
    script itself, with stand-ins for srun and scontrol, so the timing is exact."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol-calls"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TUTORIAL_ENV": "none",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "42", "EXIT_AFTER_USR1": str(train_exit)}  # fmt: skip
    script = REPO / "stages" / "03_checkpoint_restart" / "submit_pm.sh"
    job = subprocess.Popen(["bash", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    for line in job.stdout:
        if "fake srun running" in line:
            break
    job.send_signal(signal.SIGUSR1)
    output = job.stdout.read()
    assert job.wait(timeout=30) == train_exit, output
    calls = (tmp_path / "scontrol-calls").read_text() if (tmp_path / "scontrol-calls").exists() else ""
    assert calls == ("requeue 42\n" if requeued else ""), output
