"""Shared fixtures: the tiny data set, generated once per test session, and the local Slurm cluster.
(The environment every test runs in is set in the conftest.py at the repository root.)"""

import pytest

import common
from helpers import computed_once, final_weights, output_of, run_python
from slurm_fixture import local_slurm  # noqa: F401  (a fixture: tests ask for it by name)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data root that holds the `tiny` preset, made once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    common.ensure_data("tiny", root)
    return root


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory, tiny_data):
    """uninterrupted_run(stage): the folder of an uninterrupted run of a stage's `test` config, run once per session
    (the reference that resumed, interrupted and otherwise changed runs are compared with)."""

    def run(folder, stage):
        result = run_python(stage / "train.py", "--config", "test", "--out_dir", folder / "run", "--data_root",
                            tiny_data, cwd=folder)  # fmt: skip
        assert result.returncode == 0, output_of(result)

    def folder(stage):
        return computed_once(tmp_path_factory, f"uninterrupted-{stage.name}", lambda f: run(f, stage)) / "run"

    return folder


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    """uninterrupted(stage): the final weights of that run."""
    return lambda stage: final_weights(uninterrupted_run(stage))
