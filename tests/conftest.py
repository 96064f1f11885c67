"""Shared fixtures: the tiny data set, generated once per test session, and the local Slurm cluster.
(The environment every test runs in is set in the conftest.py at the repository root.)"""

import pytest

import common
from slurm_fixture import local_slurm  # noqa: F401  (a fixture: tests ask for it by name)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data root that holds the `tiny` preset, made once for the whole session."""
    root = tmp_path_factory.mktemp("data")
    common.ensure_data("tiny", root)
    return root
