"""The environment of every test and notebook that `pytest` runs, set before any of them starts (processes
and notebook kernels that the tests start inherit it):

- SCRATCH: a temporary folder, as on Perlmutter, so that default data and run folders never land in the
  repository and every test session starts from nothing;
- TUTORIAL_NOTEBOOK_SETTINGS=quick: the stage 01 notebook runs its `quick` settings (the tour sets it too);
- TUTORIAL_LOGDIR and TUTORIAL_STOP_TENSORBOARD: notebooks/start_tensorboard.ipynb serves the reference runs
  in example_logs/, checks that TensorBoard answers, then stops it;
- OMP_NUM_THREADS=1: one CPU thread per PyTorch process. With two threads on two cores, a process that
  shares the machine with any other busy process spends most of its time with one thread waiting, spinning,
  for the other: on a busy 2-core machine the suite took over 25 minutes that way, and a notebook cell timed
  out. (Bit-exact resume holds for any fixed thread count; the tests use one throughout.)

The suite runs on every CPU core, up to 4 (pytest-xdist, `-n auto --maxprocesses 4`, see pyproject.toml): its
tests mostly wait for single-threaded processes they start. Tests that share something expensive run on one
worker, in an `xdist_group` (below); the slowest start first, so that no worker is left with one at the end.

The fixtures are in tests/conftest.py.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The stage 01 notebook is run, top to bottom with its `quick` settings, by the tour (`python stages/run_all.py`,
# tests/test_tour.py), which fails if a cell fails: nbmake does not run it a second time.
collect_ignore = ["stages/01_notebook/train.ipynb"]

SCRATCH = tempfile.mkdtemp(prefix="tutorial-scratch-")
os.environ["SCRATCH"] = SCRATCH
os.environ["TUTORIAL_NOTEBOOK_SETTINGS"] = "quick"
os.environ["TUTORIAL_LOGDIR"] = str(Path(__file__).resolve().parent / "example_logs")
os.environ["TUTORIAL_STOP_TENSORBOARD"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_sessionfinish(session):
    shutil.rmtree(SCRATCH, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """Every test that uses the local Slurm cluster runs on one worker (one cluster, whose jobs queue for its one
    node). Groups and tests marked slow start first."""
    for item in items:
        if "local_slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    items.sort(key=lambda item: not (item.get_closest_marker("xdist_group") or item.get_closest_marker("slow")))


def pytest_configure(config):
    """pytest-xdist groups tests (--dist loadgroup) by editing their ids, which pytest 9.2 no longer lets it do:
    the Slurm tests would then run on several workers at once, each with a cluster of its own."""
    from packaging.version import Version

    if config.getoption("dist", None) == "loadgroup" and Version(pytest.__version__) >= Version("9.2"):
        import xdist

        if Version(xdist.__version__) <= Version("3.8.0"):
            raise pytest.UsageError(f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} cannot group "
                                    "tests: pip install -r requirements-test.txt (pytest<9.2)")  # fmt: skip
