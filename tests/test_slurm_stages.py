"""The submit scripts on a real (local, one-node) Slurm, with their Perlmutter flags as written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, SCRIPT_STAGES

SUBMIT_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "submit_pm.sh").exists()]


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
def test_submit_script_runs_the_quick_config(stage, local_slurm, tmp_path):
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    code, output = sbatch_wait(env, "-A", "tutorial", stage.relative_to(REPO) / "submit_pm.sh",
                               "--config", "quick", "--out_dir", out_dir)  # fmt: skip
    assert code == 0, output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stage"] == stage.name and summary["settings"]["config"] == "quick"
    assert summary["val_relative_l2"] < 1.0
    assert "environment: TUTORIAL_ENV=" in output and "done in" in output, output


def test_submit_from_elsewhere_says_where_to_submit(local_slurm, tmp_path):
    script = REPO / "stages" / "02_script" / "submit_pm.sh"
    result = subprocess.run(["sbatch", "--wait", "-o", str(tmp_path / "out.txt"), str(script)], cwd=tmp_path,
                            env=local_slurm, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "submit from the repository root" in (tmp_path / "out.txt").read_text()
