"""Every stage's answers to bad input, as a user meets them. (That every stage runs from another folder and writes
its log, TensorBoard events and summary, and that its `quick` config beats the physics baseline, is checked on the
tour's runs: tests/test_tour.py.)"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

import common
from helpers import REPO, SCRIPT_STAGES, finish, output_of, read_until, run_python, setting, stage_module, start

IDS = [stage.name for stage in SCRIPT_STAGES]
# The answers to bad input come from code that every stage copies from the one before (the README diffs show it
# untouched): they are checked as a user meets them, in a process of their own, on the first and the newest
# script stage, which keeps the suite short as stages are added. Every stage runs, and reads its config, here.
ENDS = list(dict.fromkeys([SCRIPT_STAGES[0], SCRIPT_STAGES[-1]]))
END_IDS = [stage.name for stage in ENDS]


def expect_one_line_error(result, *fragments):
    assert result.returncode != 0, output_of(result)
    assert "Traceback" not in result.stderr, output_of(result)
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: "), output_of(result)
    for fragment in fragments:
        assert fragment in last_line, output_of(result)


# Started as a user starts them: each stops with a one-line error. (Errors in the config alone, which every
# stage reads the same way, are also checked in-process, faster: test_config_errors_of_each_stage.)
BAD_ARGUMENTS = {
    "unknown key": (["--learning_rate", "0.1"], ["unknown option '--learning_rate'", "--{lr}"]),
    "out of range": (["--config", "test", "--num_epochs", "0"], ["--num_epochs must be >= 1; got 0"]),
    "too deep for the grid": (["--config", "test", "--depth", "9"], ["--depth 9 is too deep for a 16x16 grid"]),
    "unknown device": (["--config", "test", "--device", "gpu"], ["--device 'gpu' is not one of auto, cpu, cuda"]),
}
CONFIG_ERRORS = {
    "unknown config": (["--config", "fastest"], "unknown config 'fastest'.*quick"),
    "wrong type": (["--{batch_size}", "many"], "--{batch_size} expects a int"),
    "unknown preset": (["--data_preset", "huge"], "--data_preset must be one of micro, tiny"),
}


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments(stage, case, tmp_path, tiny_data):
    arguments, fragments = BAD_ARGUMENTS[case]
    result = run_python(stage / "train.py", *arguments, "--data_root", tiny_data, "--out_dir", tmp_path, cwd=tmp_path)
    expect_one_line_error(result, *[fragment.format(lr=setting(stage, "lr")) for fragment in fragments])


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_config_errors_of_each_stage(stage, case):
    arguments, message = CONFIG_ERRORS[case]
    batch_size = setting(stage, "batch_size")
    arguments, message = [a.format(batch_size=batch_size) for a in arguments], message.format(batch_size=batch_size)
    train = stage_module(stage)
    with pytest.raises(train.common.UserError, match=message):
        train.common.load_config(stage / "config.yaml", arguments)


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_output_folder_that_cannot_be_written(stage, tmp_path, tiny_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_python(
        stage / "train.py", "--config", "test", "--data_root", tiny_data, "--out_dir", blocker / "run", cwd=tmp_path
    )
    expect_one_line_error(result, "cannot write to", "--out_dir")


def copy_of_tiny_data(tiny_data, tmp_path):
    """A data root of our own with the micro preset (the test config's) in it, to damage without harming the shared
    one."""
    data_root = tmp_path / "data"
    (data_root / "micro").mkdir(parents=True)
    for name in ("train.npy", "val.npy", "meta.json"):
        (data_root / "micro" / name).write_bytes((tiny_data / "micro" / name).read_bytes())
    return data_root


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_corrupt_data_file(stage, tmp_path, tiny_data):
    data_root = copy_of_tiny_data(tiny_data, tmp_path)
    truncated = (tiny_data / "micro" / "train.npy").read_bytes()[:10_000]
    (data_root / "micro" / "train.npy").write_bytes(truncated)
    result = run_python(stage / "train.py", "--config", "test", "--data_root", data_root, "--out_dir", tmp_path / "r",
                        cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "corrupt", "python data/generate.py --preset micro")


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_data_of_another_seed_is_refused(stage, tmp_path, tiny_data):
    data_root = copy_of_tiny_data(tiny_data, tmp_path)
    meta = json.loads((tiny_data / "micro" / "meta.json").read_text())
    (data_root / "micro" / "meta.json").write_text(json.dumps({**meta, "seed": 7}))
    result = run_python(stage / "train.py", "--config", "test", "--data_root", data_root, "--out_dir", tmp_path / "r",
                        cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "seed 7")
    assert np.load(data_root / "micro" / "train.npy").shape[0] == meta["n_train"], "the data were left alone"


def value_out_of_range(limit):
    if isinstance(limit, list):
        return "no_such_choice"
    operator, bound = limit.split()
    return str(int(float(bound)) - 1) if operator == ">=" else bound


@pytest.mark.parametrize("stage", SCRIPT_STAGES, ids=IDS)
def test_every_number_has_limits_and_each_limit_holds(stage):
    """Every numeric setting is checked when the config is read: no traceback, no silent surprise later."""
    module = stage_module(stage)
    defaults = yaml.safe_load((stage / "config.yaml").read_text())["default"]
    numbers = {key for key, value in defaults.items() if type(value) in (int, float)}
    assert numbers <= set(common.LIMITS), f"no limits for {sorted(numbers - set(common.LIMITS))}"
    for key in set(defaults) & set(common.LIMITS):
        with pytest.raises(common.UserError, match=f"--{key} must be"):
            module.common.load_config(stage / "config.yaml", [f"--{key}", value_out_of_range(common.LIMITS[key])])


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_a_broken_config_file_is_a_one_line_error(stage, tmp_path, tiny_data):
    """A learner's edit breaks config.yaml: the error names the line and how to get the file back."""
    copy = tmp_path / "stages"
    shutil.copytree(stage, copy / stage.name)
    shutil.copytree(REPO / "stages" / "common", copy / "common")
    config = copy / stage.name / "config.yaml"
    batch_size = setting(stage, "batch_size")
    config.write_text(config.read_text().replace(f"  {batch_size}: 64", f"  {batch_size}: [64", 1))
    result = run_python(copy / stage.name / "train.py", "--data_root", tiny_data, "--out_dir", tmp_path / "r",
                        cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "is not valid YAML at line", "git checkout")


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_a_diverging_run_stops_and_says_what_to_try(stage, tmp_path, tiny_data):
    out_dir = tmp_path / "run"
    lr = setting(stage, "lr")
    result = run_python(stage / "train.py", "--config", "test", f"--{lr}", "1e30", "--data_root", tiny_data,
                        "--out_dir", out_dir, cwd=tmp_path)  # fmt: skip
    expect_one_line_error(result, "training diverged", f"smaller --{lr}")
    assert not (out_dir / "summary.json").exists(), "no summary of a run that failed"


def default_ctrl_c():
    """In the child: Ctrl-C (SIGINT) does what it does in a terminal. A shell that runs a job in the background,
    as CI may, starts it with SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(stage, out_dir, data_root, *extra):
    """Start a run of the test config in the background; return it once it has logged its first step."""
    command = [sys.executable, stage / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root,
               *extra]  # fmt: skip
    process = start(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, preexec_fn=default_ctrl_c)  # fmt: skip
    read_until(process, " | epoch ")
    return process


@pytest.mark.parametrize("stage", ENDS, ids=END_IDS)
def test_a_second_run_on_the_same_folder_is_refused(stage, tmp_path, tiny_data):
    out_dir = tmp_path / "run"
    first = start_run(stage, out_dir, tiny_data, "--num_epochs", "50")
    second = run_python(stage / "train.py", "--config", "test", f"--{setting(stage, 'lr')}", "1e-3",
                        "--out_dir", out_dir, "--data_root", tiny_data, cwd=tmp_path)  # fmt: skip
    still_running = first.poll() is None
    first.terminate()
    finish(first)
    assert still_running, "the first run ended before the second started: the test proved nothing"
    expect_one_line_error(second, f"{out_dir} is in use by another run (pid {first.pid}", "--out_dir")


def test_ctrl_c_without_checkpoints_is_a_one_line_message(tmp_path, tiny_data):
    """Stage 02 saves nothing to resume from: Ctrl-C says so in one line, without a traceback."""
    run = start_run(REPO / "stages" / "02_script", tmp_path / "run", tiny_data, "--num_epochs", "20")
    run.send_signal(signal.SIGINT)
    _, stderr = finish(run)
    assert run.returncode != 0
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)", stderr


# From stage 04 on, DataLoader workers ignore SIGTERM (Slurm's stop signal is for the main process to handle).
WORKER_STAGES = list(dict.fromkeys(s for s in (SCRIPT_STAGES[SCRIPT_STAGES.index(REPO / "stages" / "04_data_loading")],
                                                SCRIPT_STAGES[-1])))  # fmt: skip
UNEXPECTED_ERROR = """
import runpy, sys
import common
def fail(*args, **kwargs):
    raise RuntimeError("an unexpected error, as a GPU out of memory would be")
common.relative_l2 = fail  # raised during the first validation, while the DataLoader workers are alive
sys.argv = sys.argv[1:]  # train.py and its options
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("stage", WORKER_STAGES, ids=[s.name for s in WORKER_STAGES])
def test_an_unexpected_error_ends_the_run(stage, tmp_path, tiny_data):
    """Left uncaught, such an error kept the DataLoader (and its workers, which ignore SIGTERM) alive at exit:
    the process never ended, and on Slurm the job would have waited for its time limit."""
    wrapper = tmp_path / "run_with_an_error.py"
    wrapper.write_text(f"import sys\nsys.path[:0] = [{str(stage)!r}, {str(stage.parent)!r}]\n{UNEXPECTED_ERROR}")
    result = run_python(wrapper, stage / "train.py", "--config", "test", "--data_root", tiny_data, "--out_dir",
                        tmp_path / "run", cwd=tmp_path, timeout=180)  # fmt: skip
    assert result.returncode == 1, output_of(result)
    assert "RuntimeError: an unexpected error" in result.stderr, output_of(result)
