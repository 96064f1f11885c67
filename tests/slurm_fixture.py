"""A pytest fixture that runs a local one-node Slurm cluster for the whole test session.

Tests that use `local_slurm` get an environment (os.environ plus SLURM_CONF) to pass
to sbatch, srun, squeue and scancel.  Where the cluster cannot run, the tests are
skipped with a reason that says how to enable them, unless REQUIRE_SLURM=1 is set
(as in CI): then they fail instead of skipping silently.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from slurm.local_cluster import ClusterUnavailable, start, stop


@pytest.fixture(scope="session")
def local_slurm():
    # Not pytest's tmp_path: its parent folders are 0700, and munged runs as
    # the user 'munge', which must reach its socket inside the folder.
    workdir = Path(tempfile.mkdtemp(prefix="local-slurm-"))
    try:
        env = start(workdir)
    except ClusterUnavailable as error:
        shutil.rmtree(workdir, ignore_errors=True)
        reason = f"local Slurm cluster unavailable: {error}"
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"{reason}\n(REQUIRE_SLURM=1 is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(reason)
    try:
        yield {**os.environ, **env}
    finally:
        stop(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(env: dict, *args: str, cwd=None) -> str:
    """Submit without waiting; return the job id."""
    result = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                            check=True)  # fmt: skip
    return result.stdout.strip().split(";")[0]


def job_field(env: dict, job_id: str, name: str) -> str:
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True)
    match = re.search(rf"\b{name}=(\S+)", result.stdout)
    return match.group(1) if match else ""


def wait_for_job(env: dict, job_id: str, timeout: float) -> str:
    """Wait until the job has finished for good (a requeued job has not); return its state."""
    deadline = time.monotonic() + timeout
    while (state := job_field(env, job_id, "JobState")) not in FINISHED:
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s"
        time.sleep(0.5)
    return state
