"""Each stage README's "Run it" block for a laptop, run as a learner runs it: every line in order, top to bottom, in
a fresh copy of the repository (no $SCRATCH: data and runs go inside it, as on a laptop), and each line checked for
what its comment says it does.

One change to the commands as written, to keep the suite short: what trains gets `--data_preset micro --num_epochs 2`
appended (the smallest data set, 2 epochs), bench_loader.py `--data_preset micro`, bench_allreduce.py three sizes
and three repeats, predict_then_measure.py its smallest form (one repeat of one case); a line's own settings,
folders, stops and resumes are the README's. That the `quick` config as written trains well is the tour's test
(tests/test_tour.py)."""

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

import common
from helpers import REPO, STAGES, output_of, run

LAPTOP_BLOCK = re.compile(r"## Run it\n\nOn a laptop.*?```bash\n(.*?)```", re.S)
COPIED = ("stages", "data", "requirements.txt")


def laptop_lines(stage):
    """The commands of the stage README's laptop block, in order."""
    block = LAPTOP_BLOCK.search((stage / "README.md").read_text())
    assert block, f"{stage.name}/README.md has no 'On a laptop' block under '## Run it'"
    return [line for line in block[1].splitlines() if line.strip()]


# For every stage, what each line of its laptop block must do, in the block's order: its exit code, text its output
# holds, and the run folder (under runs/) whose summary.json it writes. No line may change another run's summary.
EXPECTED = {
    "02_script": [
        (0, ["writing to {runs}/02_script/quick"], "02_script/quick"),
        (0, ["writing to runs/02_script/quick-lr1e-3"], "02_script/quick-lr1e-3"),
        (0, ["config 'small'"], "02_script/small"),
    ],
    "03_checkpoint_restart": [
        (0, ["writing to {runs}/03_checkpoint_restart/quick"], "03_checkpoint_restart/quick"),
        (0, ["finished already at step 32: the figures below are that run's", "done in"], None),
        (3, ["SIGUSR1 received: saved", "at step 20"], None),
        (
            0,
            ["resuming from runs/03_checkpoint_restart/stopped/checkpoints/step-00000020.pt"],
            "03_checkpoint_restart/stopped",
        ),
        (0, ["--resume none: moved the earlier run's files"], "03_checkpoint_restart/quick"),
    ],
    "04_data_loading": [
        (0, ["worker processes"], "04_data_loading/quick"),
        (0, ["data loading: 0 worker processes"], "04_data_loading/quick-0-workers"),
        (0, ["workers", "samples/s"], None),
    ],
    "05_amp": [
        (0, ["precision fp32"], "05_amp/quick"),
        (0, ["precision bf16"], "05_amp/quick-bf16"),
    ],
    "06_ddp": [
        (0, ["rank 0 of 2: I hold 1", "rank 1 of 2: I hold 2", "rank 0 of 2: after all_reduce I hold 3"], None),
        (0, ["2 process(es), launcher torchrun"], "06_ddp/quick"),
        (0, ["1 process(es)"], "06_ddp/quick-1-process"),
    ],
    "07_large_batch": [
        (0, ["0 warmup steps"], "07_large_batch/quick"),
        (0, ["peak lr 6.00e-03 (sqrt rule", "64 samples of each batch of 128"], "07_large_batch/quick-bs128"),
        (0, ["in 8 micro-batch(es) of 64"], "07_large_batch/bs512"),
    ],
    "08_wandb_sweeps": [
        (0, ["offline"], "08_wandb_sweeps/quick"),
        (0, ["2 process(es), launcher torchrun"], "08_wandb_sweeps/quick-2proc"),
    ],
    "09_scaling": [
        (0, ["profile of steps 21-25, mean over 1 rank(s)", "profile/breakdown.json"], "09_scaling/profile-1proc"),
        (0, ["with gloo: 2 processes", "fit: t = A + 2(n-1)/n x S / B", "wrote runs/09_scaling/allreduce-2proc"], None),
        (0, ["strong scaling: global batch 64", "weak scaling: 32 per GPU"], None),
        (0, ["Perlmutter, weak scaling: 64 per GPU", "78 % weak-scaling efficiency"], None),
        (0, ["predicted", "measured, 2 processes", "allreduce_exposed"], None),
    ],
    "10_diagnose": [
        (0, ["rank 0: step", "has taken", "state is 'T", "done in", "exit code 0"], "10_diagnose/clinic/stopped-rank"),
        (0, ["Detected mismatch between collectives on ranks", "Tensor shapes: 1000vs 1"], None),
    ],
}


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    """A fresh copy of the repository's files that the commands use, and a laptop's environment: no $SCRATCH, no
    W&B login, and this test's Python and torchrun first on the PATH."""
    root = tmp_path_factory.mktemp("laptop") / REPO.name
    root.mkdir()
    for name in COPIED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("generated", "__pycache__"))
        else:
            shutil.copy(REPO / name, root / name)
    env = {key: value for key, value in os.environ.items() if key != "SCRATCH"}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "WANDB_API_KEY": "", "NETRC": str(root / "none")}
    return root, env


SHORTER = {"train.py": ["--data_preset", "micro", "--num_epochs", "2"], "bench_loader.py": ["--data_preset", "micro"],
           "bench_allreduce.py": ["--sizes", "4KB,256KB,1MB", "--repeats", "3", "--warmup", "1"],
           "predict_then_measure.py": ["--repeats", "1", "--cases", "compute", "--data_preset", "micro"]}


def as_run_here(line):
    """The README's line as words, shortened as SHORTER says."""
    words = shlex.split(line, comments=True)
    if words[0] == "python":
        words[0] = sys.executable
    script = Path(next(word for word in words if word.endswith(".py"))).name
    return words + SHORTER.get(script, [])


def summaries(runs):
    """{summary.json: its modification time} of every run under runs/."""
    return {path: path.stat().st_mtime_ns for path in runs.rglob("summary.json")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES[1:], ids=[s.name for s in STAGES[1:]])
def test_the_laptop_lines_run_top_to_bottom_and_each_does_what_it_says(stage, laptop):
    root, env = laptop
    lines, expected = laptop_lines(stage), EXPECTED[stage.name]
    assert len(lines) == len(expected), f"{stage.name}/README.md's laptop block has {len(lines)} lines: check each"
    runs = root / "runs"
    for line, (code, texts, writes) in zip(lines, expected):
        before = summaries(runs)
        result = run(as_run_here(line), cwd=root, env=env, timeout=600)
        output = result.stdout + result.stderr
        shown = f"{stage.name}: {line}\n{output_of(result)}"
        assert result.returncode == code and "Traceback" not in output, shown
        for text in texts:
            assert text.format(runs=runs) in output, f"{text!r} is not in the output of {shown}"
        after = summaries(runs)
        changed = {path for path, mtime in before.items() if after.get(path) != mtime}
        written = runs / writes / "summary.json" if writes else None
        assert changed <= {written}, f"{line}\nchanged the summary of another run: {changed}"
        if written:
            assert written in after and after[written] != before.get(written), f"{line}\nwrote no {written}"
            assert common.read_summary(written.parent)["settings"]["data_preset"] == "micro"
