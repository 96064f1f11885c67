"""Small helpers the tests share: where things are, and running a script the way a user does."""

import fcntl
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (REPO / "stages").iterdir() if p.is_dir() and p.name[:2].isdigit())
SCRIPT_STAGES = [p for p in STAGES if (p / "train.py").exists()]


def setting(stage, name):
    """A setting's name in a stage: from stage 07 on, the batch is `global_batch_size` and the learning rate
    `base_lr` (the rate at `base_batch_size`, which the stage scales for the global batch)."""
    keys = yaml.safe_load((stage / "config.yaml").read_text())["default"]
    return name if name in keys else {"batch_size": "global_batch_size", "lr": "base_lr"}[name]


def run_python(*args, cwd, env=None, timeout=900, **popen):
    """Run `python args...` in a subprocess from `cwd`, capturing its output as text."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )


def output_of(result):
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def stage_module(stage, name="train"):
    """Import a stage's train.py (or another of its scripts) as a module: it runs nothing on import. Its own
    folder is on sys.path while it imports, for `checkpoints` and the like."""
    sys.path.insert(0, str(stage))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_{stage.name}", stage / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(stage))
        for own in ("checkpoints", "train", "data_loading", "distributed", "batch_scaling"):  # each stage its own copy
            sys.modules.pop(own, None)
    return module


def computed_once(tmp_path_factory, name, compute):
    """The folder where compute(folder) wrote its results, computed once per test session, also when several
    pytest-xdist workers ask at the same time: the first computes while the others wait on a lock, then reuse."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session (each has a folder of its own below it)
    folder = base / "computed-once" / name
    folder.parent.mkdir(exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # freed when the file closes, or when this process dies
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            compute(folder)
            (folder / ".done").touch()
    return folder


def communicate_or_kill(process, timeout):
    """process.communicate(timeout=...); a process still running then is killed, with its own process group (start it
    with start_new_session=True: its DataLoader workers are in it), before the test fails: nothing is left running."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"{process.args} still ran after {timeout} s: killed") from None
