"""The READMEs: every link, path and command exists, and the computed parts match the files."""

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import common
import readme_sync
from helpers import REPO, STAGES, output_of, run_python

SKIP_DIRS = {".venv", "runs", "generated", ".git", "node_modules", ".slurm", ".pytest_cache", ".ruff_cache"}
MARKDOWN = sorted(p for p in REPO.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(REPO).parts))
IDS = [str(p.relative_to(REPO)) for p in MARKDOWN]
TOP_LEVEL = ("stages/", "data/", "slurm/", "notebooks/", "example_logs/", "tutorial_images/", "docker/", "tests/",
             ".ci/", "requirements")  # fmt: skip
GENERATED = ("data/generated", "runs/")  # made by running things, git-ignored
CLUSTER_COMMANDS = {"sbatch", "squeue", "scancel", "module", "podman-hpc", "shifterimg", "srun"}


def code_blocks(text, language="bash"):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def shell_commands(text):
    """Each simple command of the bash blocks, as a list of words (comments dropped)."""
    for block in code_blocks(text):
        for line in block.splitlines():
            for command in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(command, comments=True)
                while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the command
                    words.pop(0)
                if words:
                    yield words


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_relative_links_exist(markdown):
    text = markdown.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?|mailto):", target) or target.startswith("#"):
            continue
        path = (markdown.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{markdown.relative_to(REPO)} links to {target}, which does not exist"


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_repository_paths_exist(markdown):
    text = markdown.read_text()
    candidates = re.findall(r"`([^`\s]+)`", text) + [w for words in shell_commands(text) for w in words]
    for candidate in candidates:
        path = candidate.rstrip(".,:;)")
        if not path.startswith(TOP_LEVEL) or "<" in path or "*" in path or path.startswith(GENERATED):
            continue
        assert (REPO / path).exists(), f"{markdown.relative_to(REPO)} names {path}, which does not exist"


def check_stage_arguments(script, arguments):
    """A train.py or submit_pm.sh command line: the config and every key must be valid."""
    config_file = script.parent / "config.yaml"
    values = [a if "<" not in a else "1" for a in arguments]
    try:
        common.load_config(config_file, values)
    except common.UserError as error:
        raise AssertionError(f"{script.relative_to(REPO)} {' '.join(arguments)}: {error}") from None


def check_command(words, markdown):
    where = f"{markdown.relative_to(REPO)}: {' '.join(words)}"
    if words[0] == "eval":  # eval $(command ...): check the inner command
        return check_command(shlex.split(" ".join(words[1:]).strip("$()")), markdown)
    program = words[0].removeprefix(".venv/bin/")
    if program in ("python", "python3") and words[1] == "-m":
        assert words[2] in ("venv", "pytest", "pip", "jupyter"), f"{where}: unexpected module {words[2]}"
        return
    if program in CLUSTER_COMMANDS:
        if program == "sbatch":
            script_index = next(i for i, w in enumerate(words) if w.endswith(".sh"))
            script = REPO / words[script_index]
            assert script.exists(), where
            check_stage_arguments(script, words[script_index + 1 :])
        return
    if program in ("python", "python3"):
        script = REPO / words[1]
        assert script.exists(), where
        if script.name == "train.py":
            check_stage_arguments(script, words[2:])
        else:  # argparse checks the options given before --help, then exits 0
            values = [w.replace("$SCRATCH", "/tmp") for w in words[2:]]
            result = run_python(script, *values, "--help", cwd=REPO, timeout=120)
            assert result.returncode == 0, f"{where}\n{output_of(result)}"
        return
    if program in ("pip", "jupyter", "tensorboard", "pytest", "ruff", "shellcheck"):
        assert (Path(sys.executable).parent / program).exists(), f"{where}: {program} is not installed"
        return
    if program in ("bash", "cd", "git", "diff", "export", "cat"):
        return
    assert shutil.which(program), f"{where}: unknown command {program}"


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_commands_exist_and_take_their_arguments(markdown):
    for words in shell_commands(markdown.read_text()):
        check_command(words, markdown)


@pytest.mark.parametrize("stage", STAGES[1:], ids=[s.name for s in STAGES[1:]])
def test_readme_diff_matches_the_files(stage):
    text = (stage / "README.md").read_text()
    shown = readme_sync.between(text, readme_sync.DIFF_START, readme_sync.DIFF_END)
    assert shown is not None, f"{stage.name}/README.md has no diff markers"
    assert shown == readme_sync.diff_block(stage), "stale diff: run python tests/readme_sync.py --write"


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_output_excerpts_come_from_real_logs(markdown):
    for source, shown in readme_sync.output_blocks(markdown.read_text()):
        assert shown == readme_sync.output_block(source), f"stale excerpt of {source}: run readme_sync.py --write"


def test_runs_table_matches_the_summaries():
    shown = readme_sync.between((REPO / "README.md").read_text(), readme_sync.TABLE_START, readme_sync.TABLE_END)
    assert shown == readme_sync.runs_table(), "stale table: run python tests/readme_sync.py --write"
    assert shown.count("\n") > 2, "the table lists at least one reference run"


def test_ci_runs_the_readme_test_command():
    quick_start = code_blocks((REPO / "README.md").read_text().split("## Quick start")[1])[0].splitlines()
    assert len(quick_start) == 2, "the Quick start is exactly two commands"
    assert "stages/run_all.py" in quick_start[0] and "pytest" in quick_start[1]
    assert quick_start[1] in (REPO / ".ci" / "run").read_text().splitlines()
