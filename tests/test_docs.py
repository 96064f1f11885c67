"""The READMEs: every link, path and command exists, and the computed parts match the files."""

import ast
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import common
import readme_sync
from helpers import REPO, STAGES, output_of, run_python, stage_module

SKIP_DIRS = {".venv", "runs", "generated", ".git", "node_modules", ".slurm", ".pytest_cache", ".ruff_cache"}
MARKDOWN = sorted(p for p in REPO.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(REPO).parts))
IDS = [str(p.relative_to(REPO)) for p in MARKDOWN]
TOP_LEVEL = ("stages/", "data/", "slurm/", "notebooks/", "example_logs/", "tutorial_images/", "docker/", "tests/",
             ".ci/", "requirements")  # fmt: skip
GENERATED = ("data/generated", "runs/")  # made by running things, git-ignored
CLUSTER_COMMANDS = {"sbatch", "salloc", "squeue", "scancel", "sacct", "sacctmgr", "module", "podman-hpc", "shifterimg",
                    "srun"}  # fmt: skip


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


def heading_anchors(markdown):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_relative_links_exist(markdown):
    """Every relative link's file, and the heading it points to (`README.md#glossary`)."""
    text = markdown.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?|mailto):", target):
            continue
        file, _, anchor = target.partition("#")
        path = (markdown.parent / file).resolve() if file else markdown
        assert path.exists(), f"{markdown.relative_to(REPO)} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in heading_anchors(path), f"{markdown.relative_to(REPO)} links to {target}: no such heading"


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
            if script.name == "submit_sweep_pm.sh":  # its one argument: the sweep's id, not train.py's options
                assert len(words[script_index + 1 :]) == 1, f"{where}: give the sweep id, and only that"
            else:
                check_stage_arguments(script, words[script_index + 1 :])
        return
    if program == "torchrun":  # torchrun [its options] script.py [the script's options]
        script_index = next(i for i, w in enumerate(words) if w.endswith(".py"))
        words = ["python", *words[script_index:]]
        program = "python"
    if program in ("python", "python3"):
        script = REPO / words[1]
        assert script.exists(), where
        if script.name == "train.py":
            check_stage_arguments(script, words[2:])
        else:  # argparse checks the options given before --help, then exits 0
            values = [w.replace("$SCRATCH", "/tmp") for w in words[2:]]
            values.insert(values.index("--") if "--" in values else len(values), "--help")  # before what it passes on
            result = run_python(script, *values, cwd=REPO, timeout=120)
            assert result.returncode == 0, f"{where}\n{output_of(result)}"
        return
    if program in ("pip", "jupyter", "tensorboard", "pytest", "ruff", "shellcheck"):
        assert (Path(sys.executable).parent / program).exists(), f"{where}: {program} is not installed"
        return
    if program == "wandb":  # wandb sweep|agent|sync|login ...: a command of the installed wandb
        assert wandb_command_exists(words[1]), f"{where}: wandb has no command {words[1]}"
        return
    if program in ("bash", "cd", "git", "diff", "export", "cat"):
        return
    assert shutil.which(program), f"{where}: unknown command {program}"


@functools.cache
def wandb_command_exists(name):
    wandb = Path(sys.executable).parent / "wandb"
    return subprocess.run([wandb, name, "--help"], capture_output=True, timeout=120).returncode == 0


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


@pytest.mark.parametrize("stage", STAGES[1:], ids=[s.name for s in STAGES[1:]])
def test_the_whole_diff_is_folded_after_the_explanation_and_the_key_lines_are_its_own(stage):
    """A learner reads the concept, the Slurm part and a few dozen key lines; the whole generated diff is folded
    (<details>). Every line of the key-lines blocks (```diff, outside the generated one) is a line of the diff, but
    a file's name (`# train.py`) and `...` between excerpts."""
    text = (stage / "README.md").read_text()
    start, end = text.index(readme_sync.DIFF_START), text.index(readme_sync.DIFF_END)
    assert text.rfind("<details>", 0, start) > text.rfind("</details>", 0, start), "the whole diff is folded"
    assert text.find("</details>", end) > 0 and "## " not in text[end : text.find("</details>", end)]
    assert "## Slurm" not in text[start:], "the Slurm part comes before the diff"
    diff_lines = set(readme_sync.expected_diff(stage).splitlines())
    blocks = code_blocks(text[:start] + text[end:], "diff")
    key_lines = [line for block in blocks for line in block.splitlines() if line != "..." and line[:2] != "# "]
    assert 10 <= len(key_lines) <= 45, f"{len(key_lines)} key lines: a few dozen"
    for line in key_lines:
        assert line in diff_lines, f"{stage.name}/README.md shows a key line that is not in the diff: {line}"


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


def test_data_readme_generates_where_the_stages_look(tmp_path):
    """Data generated ahead, as data/README.md says, must be found by the stages (and not generated again
    inside a GPU job). The README's commands run here with the tiny preset and a $SCRATCH of their own."""
    commands = [w for w in shell_commands((REPO / "data" / "README.md").read_text()) if "data/generate.py" in w]
    assert commands, "data/README.md shows how to generate the data ahead"
    for number, words in enumerate(commands):
        scratch = tmp_path / f"scratch{number}"  # each command on its own, so one cannot hide another
        start = next(i for i, w in enumerate(words) if w.endswith("generate.py"))
        arguments = [os.path.expandvars(w.replace("$SCRATCH", str(scratch))) for w in words[start + 1 :]]
        arguments[arguments.index("--preset") + 1] = "tiny"
        result = run_python(REPO / "data" / "generate.py", *arguments, cwd=REPO, env={"SCRATCH": str(scratch)})
        assert result.returncode == 0, output_of(result)
        assert (scratch / REPO.name / "data" / "tiny" / "meta.json").exists(), f"{' '.join(words)} wrote elsewhere"


def notebook_code(notebook):
    return "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]
                     if cell["cell_type"] == "code")  # fmt: skip


def test_notebook_settings_are_stage_02_configs():
    """The stage 01 notebook says its `gpu` settings are stage 02's `default` and `quick` its `quick`: the same
    values, the same optimizer settings and the same learning-rate schedule."""
    code = notebook_code(REPO / "stages" / "01_notebook" / "train.ipynb")
    literal = ast.parse(re.search(r"SETTINGS = (\{.*?\n\})", code, re.S).group(1), mode="eval").body
    settings = {ast.literal_eval(name): {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                for name, call in zip(literal.keys, literal.values)}  # fmt: skip
    configs = yaml.safe_load((REPO / "stages" / "02_script" / "config.yaml").read_text())
    for name, config in [("gpu", configs["default"]), ("quick", {**configs["default"], **configs["quick"]})]:
        different = {k: (v, config.get(k)) for k, v in settings[name].items() if config.get(k) != v}
        assert not different, f"notebook {name!r} settings differ from stage 02 (notebook, config): {different}"
        assert "weight_decay" in settings[name], f"notebook {name!r} settings leave weight_decay to AdamW's default"
    assert "weight_decay=settings.weight_decay" in code and "CosineAnnealingLR(optimizer" in code
    assert "scheduler.step()" in code


def test_notebooks_run_quick_and_write_outside_the_repository():
    """Under the suite, notebooks run their `quick` settings and write to a temporary $SCRATCH, so that a busy
    machine cannot make a cell time out and nothing lands in the repository's runs/ or data/."""
    assert os.environ["TUTORIAL_NOTEBOOK_SETTINGS"] == "quick"
    runs = common.run.output_root("runs", default=Path("runs"))
    assert not runs.resolve().is_relative_to(REPO), runs
    assert runs.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()), runs


# The files a stage changes as part of its concept, and so does not copy from the stage before (the stage README
# shows the diff of each changed .py file).
CHANGED_BY_CONCEPT = {
    "06_ddp": {"submit_pm.sh", "data_loading.py"},  # a whole node: 4 processes, 4 GPUs; each its share of a batch
    "07_large_batch": {"data_loading.py"},  # each share in micro-batches
    "10_diagnose": {"submit_pm.sh", "data_loading.py"},  # USR2 (the stacks) trapped, and ignored in the workers
}
COPIED = {"checkpoints.py", "predict.py", "submit_pm.sh", "distributed.py", "submit_pm_torchrun.sh", "data_loading.py",
          "batch_scaling.py", "speedups.py", "tracking.py", "sweeps.py", "sweep.yaml", "sweep_random.yaml"}  # fmt: skip


@pytest.mark.parametrize("stage", STAGES[3:], ids=[s.name for s in STAGES[3:]])
def test_files_copied_from_the_stage_before_match_it(stage):
    """The files of COPIED that a stage has are copied from stage to stage unchanged (but for the stage's name), so a
    fix in one must reach every later stage."""
    before = STAGES[STAGES.index(stage) - 1]
    for name in sorted(COPIED - CHANGED_BY_CONCEPT.get(stage.name, set())):
        if (before / name).exists():
            expected = (before / name).read_text().replace(before.name, stage.name)
            assert (stage / name).read_text() == expected, f"{stage.name}/{name} differs from {before.name}/{name}"


def test_the_wandb_version_asked_for_syncs_every_piece_of_a_resumed_offline_run():
    """Stage 08's README says that `wandb sync` uploads the pieces of a resumed offline run in order from wandb 0.30
    on (older versions overwrote the first piece: wandb issues 3841, 5865): requirements.txt asks for at least that,
    and the installed wandb's own `wandb sync` documents it (wandb/cli/cli.py)."""
    import wandb

    [requirement] = [line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("wandb")]
    minimum = re.match(r"wandb>=([\d.]+)", requirement).group(1)
    assert tuple(map(int, minimum.split("."))) >= (0, 30), requirement
    assert f"from wandb {minimum} on" in (REPO / "stages" / "08_wandb_sweeps" / "README.md").read_text()
    cli = (Path(wandb.__file__).parent / "cli" / "cli.py").read_text()
    assert "the files are synced sequentially in order of start time" in cli


def test_w_and_b_timeouts_the_readme_states_are_w_and_bs_own():
    """wandb's default init_timeout (wandb/sdk/wandb_settings.py) is what tracking.py and the README say."""
    import wandb

    tracking = stage_module(REPO / "stages" / "08_wandb_sweeps", "tracking")
    assert wandb.Settings().init_timeout == tracking.INIT_TIMEOUT_S == 90
    assert "W&B's\nown 90 s (`init_timeout`" in (REPO / "stages" / "08_wandb_sweeps" / "README.md").read_text()


@pytest.mark.parametrize("markdown", MARKDOWN, ids=IDS)
def test_a_counted_list_has_as_many_items_as_it_says(markdown):
    """"Two traps:" followed by three was in stage 04's README."""
    numbers = {"Two": 2, "Three": 3, "Four": 4, "Five": 5, "Six": 6}
    text = markdown.read_text()
    counted_list = r"\n(Two|Three|Four|Five|Six) [a-z]+[^\n]*:\n\n((?:- [^\n]*\n(?:  [^\n]*\n)*)+)"
    for word, items in re.findall(counted_list, text):
        count = len(re.findall(r"^- ", items, re.M))
        assert count == numbers[word], f"{markdown.relative_to(REPO)}: '{word} ...' is followed by {count} items"


def test_the_walkthrough_follows_nersc_on_where_to_submit_from_and_states_measured_times():
    """NERSC's deep-learning tutorials (NERSC/dl4sci25-dl-at-scale's README) ask for a login-node server to submit
    jobs from; the walkthrough says so, and says why a job submitted from inside another one gets a clean Slurm
    environment. Generating `full` takes the 150 s that data/README.md reports as measured."""
    import json

    cells = json.loads((REPO / "notebooks" / "00_walkthrough.ipynb").read_text())["cells"]
    text = "".join("".join(cell["source"]) for cell in cells)
    assert '**login node** server ("Perlmutter Login Node"), as\nNERSC\'s own deep-learning tutorials ask' in text
    assert "SLURM_MEM_PER_NODE are mutually exclusive" in text and "env=slurm_env" in text
    assert "`full` (the GPU runs) about 150 s" in text and "150 s to generate" in (REPO / "data/README.md").read_text()




def test_the_study_command_and_duration_the_readme_states_are_the_reference_study_s():
    """Stage 07's README gives the study's command as the reference study ran it, and its duration, read from the
    five runs' summaries."""
    folder = REPO / "example_logs" / "07_large_batch-study-small-cpu"
    total = sum(common.read_summary(run)["wall_time_s"] for run in folder.iterdir() if (run / "summary.json").exists())
    text = (REPO / "stages" / "07_large_batch" / "README.md").read_text()
    assert f"(about {round(total / 600) * 10} minutes on a 2-core CPU: its five runs\ntook {total:.0f} s" in text
    command = (folder / "COMMAND").read_text().split()
    del command[command.index("--out_dir") : command.index("--out_dir") + 2]
    assert f"```bash\n{' '.join(command)}   #" in text, "the command as the reference study ran it"


NOTEBOOKS = sorted(p for p in REPO.rglob("*.ipynb") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


@pytest.mark.parametrize("page", MARKDOWN + NOTEBOOKS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_question_has_an_answer_a_learner_can_unfold(page):
    """Each *Question:* is followed, before the next one, by <details><summary>Answer</summary> ... </details>."""
    if page.suffix == ".ipynb":
        cells = json.loads(page.read_text())["cells"]
        text = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    else:
        text = page.read_text()
    for question in text.split("*Question:*")[1:]:
        answer = question.find("<details><summary>Answer</summary>")
        assert 0 < answer < question.find("</details>"), f"{page.relative_to(REPO)}: no answer to{question[:80]}"
