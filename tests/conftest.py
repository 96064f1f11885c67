"""Shared fixtures: the test configs' data set, generated once per test session, and the local Slurm cluster.
(The environment every test runs in is set in the conftest.py at the repository root.)"""

import json
import shutil

import pytest

import common
from helpers import computed_once, final_weights, output_of, run_python, spied_run
from slurm_fixture import local_slurm  # noqa: F401  (a fixture: tests ask for it by name)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data root that holds the `micro` preset (the `test` configs') and the `tiny` one, made once for the whole
    session."""
    root = tmp_path_factory.mktemp("data")
    common.ensure_data("micro", root)
    common.ensure_data("tiny", root)
    return root


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, tiny_data):
    """uninterrupted_run(stage): the folder of an uninterrupted run of a stage's `test` config, run once per session
    (the reference that resumed, interrupted and otherwise changed runs are compared with)."""

    def folder(stage):
        return computed_once(tmp_path_factory, f"uninterrupted-{stage.name}",
                             lambda f: run_test_config(f, stage, tiny_data))  # fmt: skip

    return lambda stage: folder(stage) / "run"


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory, tiny_data):
    """stopped_run(stage, step, into): a copy, in the folder `into`, of a run of a stage's `test` config stopped by
    --signal_at_step `step` (it exits with 3 after saving at that step). The stopped run is run once per session;
    each test gets a copy of its own to resume, damage or refuse."""

    def copy(stage, step, into):
        stopped = computed_once(tmp_path_factory, f"stopped-{stage.name}-{step}", lambda f: run_test_config(
            f, stage, tiny_data, "--signal_at_step", step, expect=3))  # fmt: skip
        return shutil.copytree(stopped / "run", into, symlinks=True)

    return copy


def run_test_config(folder, stage, data_root, *settings, expect=0):
    """A run of the stage's `test` config into folder/run."""
    result = run_python(stage / "train.py", "--config", "test", "--out_dir", folder / "run", "--data_root", data_root,
                        *map(str, settings), cwd=folder)  # fmt: skip
    assert result.returncode == expect, output_of(result)


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    """uninterrupted(stage): the final weights of that run."""
    return lambda stage: final_weights(uninterrupted_run(stage))


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
    """run(stage): (folder, records) of a 2-process run that also generated its data (run once per session)."""

    def run(stage):
        folder = computed_once(tmp_path_factory, f"spied-2-{stage.name}",
                               lambda folder: spied_run(stage, folder, folder / "data", 2))  # fmt: skip
        return folder, [json.loads((folder / f"record-rank{rank}.json").read_text()) for rank in range(2)]

    return run
