"""Small helpers the tests share: where things are, and running a script the way a user does."""

import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (REPO / "stages").iterdir() if p.is_dir() and p.name[:2].isdigit())
SCRIPT_STAGES = [p for p in STAGES if (p / "train.py").exists()]
SPY = REPO / "tests" / "spy_run.py"  # runs a train.py and records what only the inside of the run sees


def setting(stage, name):
    """A setting's name in a stage: from stage 06 on, the batch is `global_batch_size` (the processes share it);
    from stage 07 on, the learning rate is `base_lr` (the rate at `base_batch_size`, scaled for the global batch)."""
    keys = yaml.safe_load((stage / "config.yaml").read_text())["default"]
    return name if name in keys else {"batch_size": "global_batch_size", "lr": "base_lr"}[name]


def start(command, *, cwd=None, env=None, timeout=240, **popen):
    """subprocess.Popen(command) in a process group of its own, which a watchdog kills with all its descendants
    (DataLoader workers, torchrun's ranks) if it still runs `timeout` seconds after it started: a hang costs its
    bound, not the test session's, and leaves nothing running. `process.timed_out` says whether the watchdog struck."""
    process = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, text=True, start_new_session=True,
                               **popen)  # fmt: skip
    process.timed_out = False

    def kill():
        if process.poll() is None:
            process.timed_out = True
            kill_tree(process.pid)

    process.watchdog = threading.Timer(timeout, kill)
    process.watchdog.daemon = True
    process.watchdog.start()
    return process


def process_tree(pid):
    """`pid` and every process descended from it, parents first (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid):
    """SIGKILL to `pid` and all its descendants at once, as Slurm ends a job (all processes of its cgroup). Killing
    the process group is not enough: torchrun starts each rank in a session of its own."""
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run(command, *, cwd=None, env=None, timeout=240, **popen):
    """subprocess.run(command, capture_output=True, text=True), in its own process group, under start's watchdog."""
    process = start(command, cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    **popen)  # fmt: skip
    stdout, stderr = process.communicate()
    process.watchdog.cancel()
    assert not process.timed_out, f"{process.args} still ran after {timeout} s: killed\n{stdout}\n{stderr}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_python(*args, cwd, env=None, timeout=240, **popen):
    """Run `python args...` from `cwd` (the environment: this one, plus `env`), capturing its output as text."""
    return run([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout, **popen)


def read_until(process, text):
    """Read a started process's output up to the line that holds `text`; return what was read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    killed = " (killed by the watchdog)" if process.timed_out else ""
    raise AssertionError(f"the run ended{killed} before printing {text!r}:\n{''.join(lines)}")


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


def finish(process):
    """(stdout, stderr) of a process that start() started, once it ends (or its watchdog killed it: then the test
    fails, saying so)."""
    stdout, stderr = process.communicate()
    process.watchdog.cancel()
    assert not process.timed_out, f"{process.args} still ran after its time: killed\n{stdout}\n{stderr}"
    return stdout, stderr


def saved_by_the_stop(output):
    """The checkpoint that a stopped run's last line names ("... received: saved <path> at step <n>; ...")."""
    found = re.findall(r"received: saved (\S+) at step \d+;", output)
    assert found, f"no checkpoint saved at a stop in:\n{output}"
    return Path(found[-1])


def assert_resumed_from(output, checkpoint):
    """The exact line of a resume from `checkpoint`, step-<N>.pt (a run from scratch, which ends with the same
    weights, prints none). (The epoch is not read from the file: a resumed run may have saved that step again.)"""
    step = int(Path(checkpoint).stem.removeprefix("step-"))
    line = rf"resuming from {re.escape(str(checkpoint))}: epoch \d+, step {step}$"
    assert re.search(line, output, re.MULTILINE), f"no line {line!r} in:\n{output}"


def final_state(out_dir):
    """The newest checkpoint of a run folder, loaded."""
    return torch.load(sorted((Path(out_dir) / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)


def rng_fingerprint(state):
    """A random generator's state (a uint8 tensor, as torch.get_rng_state returns it), short."""
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()


def final_weights(out_dir):
    return final_state(out_dir)["model"]


def spied_run(stage, folder, data_root, nproc):
    """A run of the test config (2 epochs, the loss logged at every step) under tests/spy_run.py: its folder and
    what each rank recorded."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc] if nproc > 1 else []
    arguments = ["--config", "test", "--log_every", "1", "--out_dir", folder / "run", "--data_root", data_root]
    result = run_python(*launcher, SPY, folder / "record.json", stage / "train.py", *arguments, cwd=folder)
    assert result.returncode == 0, output_of(result)
    return [json.loads((folder / f"record-rank{rank}.json").read_text()) for rank in range(nproc)]
