"""Small helpers the tests share: where things are, and running a script the way a user does."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (REPO / "stages").iterdir() if p.is_dir() and p.name[:2].isdigit())
SCRIPT_STAGES = [p for p in STAGES if (p / "train.py").exists()]


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
        for own in ("checkpoints", "train"):  # each stage has its own copy
            sys.modules.pop(own, None)
    return module
