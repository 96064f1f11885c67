"""notebooks/00_walkthrough.ipynb against the local one-node Slurm: its submit cell really submits stage 06 (4
processes on the fake 4-GPU node), its watch cell follows the job to the end, and its last cell reads the run's
summary. It runs as in a JupyterHub server on a GPU node, inside a Slurm job of its own, whose SLURM_* variables an
sbatch would pass on: the job it submits must still run. (nbmake also runs the notebook where no Slurm answers: then
those cells say what they would do.)"""

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOK = REPO / "notebooks" / "00_walkthrough.ipynb"
# Some variables of a one-GPU job on the shared QOS, inside a step: its memory is per CPU. The local cluster gives
# whole-node jobs their memory per node (as Perlmutter's regular QOS does), and srun refuses a job that has both.
ANOTHER_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_PER_TASK": "1",
               "SLURM_MEM_PER_CPU": "1952", "SLURM_JOB_NODELIST": "nid001234"}  # fmt: skip


def outputs(notebook):
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))


def test_walkthrough_submits_stage_06_and_watches_it_finish(local_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", local_slurm["SLURM_CONF"])
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}")
    monkeypatch.setenv("SCRATCH", str(tmp_path))  # its own data, runs and job log
    monkeypatch.setenv("SBATCH_ACCOUNT", "tutorial")  # what `sbatch -A` would say; the notebook's ACCOUNT is None
    for name, value in ANOTHER_JOB.items():  # the kernel runs in another job (a server on a shared GPU node)
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    text = outputs(notebook)
    assert "inside Slurm job 4242" in text and "submitted job" in text and "COMPLETED" in text, text
    assert "--qos=debug --time=00:10:00 stages/06_ddp/submit_pm.sh" in text, "a QOS and a limit fit for a short try"
    assert "06_ddp on CPU" in text and "4 processes" in text, text
    assert "done in" in text, "the watch cell shows the end of the job's log"
    [log] = (tmp_path / REPO.name / "slurm_logs").glob("slurm-06_ddp-*.out")
    assert "4 process(es)" in log.read_text(), log.read_text()
