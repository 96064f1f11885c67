"""shellcheck on every shell script, ruff on the Python."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SKIP_DIRS = {".venv", "runs", ".git", "data"}
SHELL_SCRIPTS = sorted(
    [p for p in REPO.rglob("*.sh") if not SKIP_DIRS & set(p.relative_to(REPO).parts)] + [REPO / ".ci" / "run"]
)
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SHELL_SCRIPTS])
def test_shellcheck(script):
    result = subprocess.run([BIN / "shellcheck", "-x", script.relative_to(REPO)], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_submit_scripts_are_strict_and_comment_every_sbatch_line():
    for script in REPO.glob("stages/*/submit*.sh"):
        lines = script.read_text().splitlines()
        assert "set -euo pipefail" in lines, script
        for line in lines:
            if line.startswith("#SBATCH"):
                assert "#" in line[1:], f"{script.relative_to(REPO)}: explain this line: {line}"
            assert not line.startswith(("#SBATCH -A", "#SBATCH --account", "#SBATCH --reservation")), (
                f"{script.relative_to(REPO)}: the account is given at submission, never in the script"
            )


def test_ruff():
    result = subprocess.run([BIN / "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def sbatch_options(script):
    """{option: value} of a script's #SBATCH lines, e.g. {"--qos": "shared", "--gpus-per-task": "1"}."""
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            option, _, value = line.split()[1].partition("=")
            options[option] = value
    return options


def test_one_gpu_jobs_use_the_shared_qos():
    """A one-GPU job on `regular` is given, and charged for, a whole 4-GPU node: one GPU means `shared`,
    with a quarter of the node's CPU threads."""
    for script in sorted(REPO.glob("stages/*/submit_pm.sh")):
        options = sbatch_options(script)
        gpus = int(options.get("--gpus-per-task", 0)) * int(options.get("--ntasks", 1)) or int(
            options.get("--gpus-per-node", 0)
        )
        if gpus == 1:
            assert options.get("--qos") == "shared", f"{script.relative_to(REPO)}: one GPU, so --qos=shared"
            assert options.get("--cpus-per-task") == "32", f"{script.relative_to(REPO)}: a quarter of 128 threads"
        else:
            assert options.get("--qos") in ("regular", "debug"), f"{script.relative_to(REPO)}: whole nodes"


def test_every_command_line_refuses_abbreviated_options():
    """argparse reads a prefix of an option as the option (`--num_epoch` as `--num_epochs`, `--lr` as
    `--lr_scaling`): every parser of this repository refuses that (allow_abbrev=False)."""
    for path in sorted(REPO.rglob("*.py")):
        if ".venv" in path.parts or path.name == "test_lint.py":
            continue
        text = path.read_text()
        parsers = text.count("argparse.ArgumentParser(")
        assert text.count("allow_abbrev=False") == parsers, f"{path.relative_to(REPO)}: a parser allows abbreviations"
