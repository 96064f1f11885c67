"""notebooks/00_walkthrough.ipynb against the local one-node Slurm: its submit cell really submits stage 06 (4
processes on the fake 4-GPU node), its watch cell follows the job to the end, and its last cell reads the run's
summary. (nbmake also runs the notebook where no Slurm answers: then those cells say what they would do.)"""

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOK = REPO / "notebooks" / "00_walkthrough.ipynb"


def outputs(notebook):
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


def test_walkthrough_submits_stage_06_and_watches_it_finish(local_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", local_slurm["SLURM_CONF"])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}")
    monkeypatch.setenv("SCRATCH", str(tmp_path))  # its own data, runs and job log
    monkeypatch.setenv("SBATCH_ACCOUNT", "tutorial")  # what `sbatch -A` would say; the notebook's ACCOUNT is None
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    text = outputs(notebook)
    assert "submitted job" in text and "COMPLETED" in text, text
    assert "06_ddp on CPU" in text and "4 processes" in text, text
    assert "done in" in text, "the watch cell shows the end of the job's log"
    [log] = (tmp_path / REPO.name / "slurm_logs").glob("slurm-06_ddp-*.out")
    assert "4 process(es)" in log.read_text(), log.read_text()
