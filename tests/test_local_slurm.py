"""Tests of the local Slurm cluster: Perlmutter-style sbatch options, signals, requeue.

They use the session fixture `local_slurm` (tests/slurm_fixture.py).
"""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurm import local_cluster
from slurm_fixture import job_field, submit, wait_for_job

REPO = Path(__file__).resolve().parents[1]
PERLMUTTER_GPU_OPTIONS = [
    "-C", "gpu", "-q", "regular", "-A", "anyaccount",
    "--gpus-per-node", "4", "--ntasks-per-node", "4", "-c", "32", "--time", "5",
]  # fmt: skip


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


def wait_for_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.1)


def test_perlmutter_gpu_job_runs_four_tasks(local_slurm, tmp_path):
    script = write_script(
        tmp_path / "job.sh",
        "srun bash -c 'echo $SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS $SLURM_JOB_NODELIST $CUDA_VISIBLE_DEVICES'\n",
    )
    output = tmp_path / "job.out"
    command = ["sbatch", "--wait", *PERLMUTTER_GPU_OPTIONS, "--output", str(output), str(script)]
    result = subprocess.run(command, env=local_slurm, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + output.read_text()

    tasks = sorted(line.split() for line in output.read_text().splitlines())
    host = socket.gethostname().split(".")[0]
    assert tasks == [[str(i), str(i), "4", host, "0,1,2,3"] for i in range(4)]


def test_sbatch_wait_returns_the_job_exit_code(local_slurm):
    result = subprocess.run(["sbatch", "--wait", "--output", "/dev/null", "--wrap", "exit 3"], env=local_slurm)
    assert result.returncode == 3


def test_usr1_reaches_a_trap_in_the_batch_shell(local_slurm, tmp_path):
    # srun runs in the background: bash runs a trap only between commands, and
    # `wait` returns as soon as a signal arrives.  Killing srun in the trap keeps
    # this right even if the signal comes before `wait` starts.
    ready = tmp_path / "ready"
    script = write_script(
        tmp_path / "job.sh",
        f"""\
trap 'echo "caught USR1"; kill $step' USR1
srun sleep 60 &
step=$!
: > {ready}
wait $step
echo "batch shell done"
""",
    )
    output = tmp_path / "job.out"
    # Slurm would send USR1 by itself 30 s (up to 90 s) before the time limit;
    # the test sends it at once instead of relying on that timing.
    job_id = submit(local_slurm, "--signal=B:USR1@30", "--time", "5", "--output", str(output), str(script))
    wait_for_file(ready)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=local_slurm, check=True)

    assert wait_for_job(local_slurm, job_id, timeout=30) == "COMPLETED"
    lines = output.read_text().splitlines()
    assert "caught USR1" in lines and "batch shell done" in lines


def test_requeue_from_the_trap_runs_the_job_again(local_slurm, tmp_path):
    ready = tmp_path / "ready"
    script = write_script(
        tmp_path / "job.sh",
        f"""\
echo "run ${{SLURM_RESTART_COUNT:-0}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "finished after requeue"; exit 0; fi
# As the stages' submit_pm.sh do, the trap exits after the requeue: the kill that
# ends the requeued run may come after the shell has run a few more lines.
trap 'echo "requeueing"; scontrol requeue $SLURM_JOB_ID; exit 0' USR1
srun sleep 60 &
: > {ready}
wait $!
echo "not requeued"
exit 1
""",
    )
    output = tmp_path / "job.out"
    options = ["--requeue", "--open-mode=append", "--signal=B:USR1@30", "--time", "5"]
    job_id = submit(local_slurm, *options, "--output", str(output), str(script))
    wait_for_file(ready)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=local_slurm, check=True)

    # About 11 s: a requeued job waits for cred_expire=10 before it runs again.
    assert wait_for_job(local_slurm, job_id, timeout=45) == "COMPLETED"
    assert job_field(local_slurm, job_id, "Restarts") == "1"
    runs = [line for line in output.read_text().splitlines() if not line.startswith(("slurmstepd", "srun"))]
    assert runs == ["run 0", "requeueing", "run 1", "finished after requeue"]


def test_cli_starts_and_stops_a_second_cluster(local_slurm):
    workdir = Path(tempfile.mkdtemp(prefix="local-slurm-cli-"))
    cli = [sys.executable, str(REPO / "slurm" / "local_cluster.py")]
    try:
        started = subprocess.run([*cli, "start", "--dir", str(workdir)], capture_output=True, text=True, check=True)
        conf = workdir / "etc" / "slurm.conf"
        assert started.stdout == f"export SLURM_CONF={conf}\n"
        env = {**local_slurm, "SLURM_CONF": str(conf)}
        subprocess.run(["srun", "-n1", "true"], env=env, check=True, timeout=30)
        subprocess.run([*cli, "stop", "--dir", str(workdir)], check=True)
        subprocess.run([*cli, "stop", "--dir", str(workdir)], check=True)  # stopping twice is harmless
        assert "DOWN" in subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True).stdout
        # The session's cluster, in its own folder, is still up.
        assert "UP" in subprocess.run(["scontrol", "ping"], env=local_slurm, capture_output=True, text=True).stdout
    finally:
        local_cluster.stop(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def test_missing_packages_say_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setattr(local_cluster, "COMMANDS", ("no-such-slurm-daemon",))
    with pytest.raises(local_cluster.ClusterUnavailable, match="no-such-slurm-daemon not found: apt-get install"):
        local_cluster.start(tmp_path)
