"""Stage 06, data parallel on a CPU with gloo: the same step as one process, an agreed stop, a bit-exact resume
with 2 ranks, and clear refusals. (torchrun on `quick` is run by the tour, tests/test_tour.py; srun, the
requeue and a dead rank on the local Slurm, tests/test_slurm_stages.py.)"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from helpers import (
    REPO,
    SCRIPT_STAGES,
    assert_resumed_from,
    finish,
    kill_tree,
    output_of,
    read_until,
    run_python,
    saved_by_the_stop,
    stage_module,
    start,
)
from test_checkpoint import assert_same_weights, final_weights

STAGE = REPO / "stages" / "06_ddp"


def torchrun(out_dir, data_root, *extra, nproc=2, **popen):
    """`torchrun --standalone --nproc_per_node 2 stages/06_ddp/train.py --config test ...`, as the README says."""
    return run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, STAGE / "train.py",
                      "--config", "test", "--out_dir", out_dir, "--data_root", data_root, *extra, cwd=out_dir.parent,
                      **popen)  # fmt: skip


@pytest.fixture(scope="session")
def two_ranks(two_process_runs):
    """The final weights of an uninterrupted run with 2 processes (tests/conftest.py: run once per session)."""
    folder, _ = two_process_runs(STAGE)
    return final_weights(folder / "run")


def checkpoint_after_one_step(out_dir, data_root, nproc):
    """Train one step (the signal at step 1 stops the run there, with a checkpoint) and load that checkpoint."""
    arguments = ["--checkpoint_every", "1", "--signal_at_step", "1"]
    if nproc == 1:
        result = run_python(STAGE / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root,
                            *arguments, cwd=out_dir.parent)  # fmt: skip
    else:
        result = torchrun(out_dir, data_root, *arguments, nproc=nproc)
    assert "saved" in result.stdout and "at step 1;" in result.stdout, output_of(result)
    return torch.load(out_dir / "checkpoints" / "step-00000001.pt", weights_only=True)


def test_two_ranks_take_the_step_of_one_process_with_their_batch(tmp_path, tiny_data):
    """2 processes x 16 samples make the same update as 1 process x 32 (the test config's global batch is 32)."""
    one = checkpoint_after_one_step(tmp_path / "one", tiny_data, nproc=1)
    two = checkpoint_after_one_step(tmp_path / "two", tiny_data, nproc=2)
    assert_same_step(one, two)


def assert_same_step(one, two):
    """Two checkpoints after one AdamW step from the same start took the same step. Not bit for bit: the mean
    gradient is summed in another order. The gradients (AdamW's first moment after one step is 0.1 x the
    gradient), all together, agree to 1e-5 relative. The weights agree to 1e-4 absolute (lr is 2e-3), except
    where the gradient is only rounding noise: a convolution's bias followed by GroupNorm has an exact gradient
    of 0, and AdamW's first step moves a weight by about lr x gradient / |gradient|, noise or not."""
    moments = [[state["exp_avg"] for state in c["optimizer"]["state"].values()] for c in (one, two)]
    everything = [torch.cat([m.flatten() for m in ms]) for ms in moments]
    assert (everything[0] - everything[1]).norm() <= 1e-5 * everything[0].norm()
    for key, moment in zip(one["model"], moments[0]):  # the model has no buffers: one state per weight, in order
        if moment.norm() > 1e-6 * everything[0].norm():
            torch.testing.assert_close(two["model"][key], one["model"][key], rtol=0, atol=1e-4, msg=key)


def rank_process(parent_pid, rank):
    """The pid of the training process of `rank` among the children of torchrun (`parent_pid`)."""
    for child in open(f"/proc/{parent_pid}/task/{parent_pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no process of rank {rank} under {parent_pid}")


def start_torchrun(out_dir, data_root):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               STAGE / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root", data_root]  # fmt: skip
    return start(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=180, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT)  # fmt: skip


def test_a_signal_to_one_rank_stops_all_at_the_same_step_and_resume_is_bit_exact(tmp_path, tiny_data, two_ranks):
    """SIGTERM to rank 1 alone (it writes nothing): the ranks agree at their next check, rank 0 saves, all stop;
    the rerun resumes and ends with the weights of an uninterrupted 2-process run, bit for bit."""
    out_dir = tmp_path / "run"
    job = start_torchrun(out_dir, tiny_data)
    read_until(job, "step 8/")
    os.kill(rank_process(job.pid, 1), signal.SIGTERM)
    output, _ = finish(job)
    assert "a stop signal to another process received: saved" in output, output
    resumed = torchrun(out_dir, tiny_data)
    assert resumed.returncode == 0, output_of(resumed)
    assert_resumed_from(resumed.stdout, saved_by_the_stop(output))
    assert_same_weights(final_weights(out_dir), two_ranks)


def test_sigterm_to_torchrun_itself_saves_then_torchrun_prints_its_own_traceback(tmp_path, tiny_data):
    """`timeout` (and scancel of a step that runs torchrun) sends SIGTERM to torchrun, not to the ranks: torchrun
    passes it on to them, they save at the same step and stop, then torchrun raises its own SignalException. The
    README's pitfall says which line counts."""
    job = start_torchrun(tmp_path / "run", tiny_data)
    read_until(job, "step 8/")
    job.send_signal(signal.SIGTERM)
    output, _ = finish(job)
    assert job.returncode != 0 and "SIGTERM received: saved" in output, output
    assert output.rstrip().splitlines()[-1].startswith("torch.distributed.elastic.multiprocessing.api.SignalException")


def test_sigkill_of_the_whole_job_then_resume_is_bit_exact(tmp_path, tiny_data, two_ranks):
    """Also: with no data yet, rank 0 alone generates them (once) while rank 1 waits."""
    out_dir, data_root = tmp_path / "run", tmp_path / "fresh_data"
    job = start_torchrun(out_dir, data_root)
    output = read_until(job, "step 8/")
    assert output.count("generating it now") == 1, output
    time.sleep(0.1)
    kill_tree(job.pid)  # torchrun, both ranks and their data workers: no chance to save
    job.wait()
    job.watchdog.cancel()
    on_disk = sorted((out_dir / "checkpoints").glob("step-*.pt"))
    assert on_disk, "no checkpoint before the kill: it tested nothing"
    assert on_disk[-1].name != "step-00000032.pt", "the kill came after the run had finished: it tested nothing"
    resumed = torchrun(out_dir, data_root)
    assert resumed.returncode == 0, output_of(resumed)
    assert_resumed_from(resumed.stdout, on_disk[-1])
    assert_same_weights(final_weights(out_dir), two_ranks)  # the data are generated the same, from their seed


def test_one_process_without_a_launcher_trains_as_stage_05_bit_for_bit(uninterrupted):
    """The README's claim: one process and no launcher is stage 05 (the same batches, the same arithmetic)."""
    assert_same_weights(uninterrupted(STAGE), uninterrupted(REPO / "stages" / "05_amp"))


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path, tiny_data):
    """Checked before any process group exists: rank 0 of 2, as torchrun would start it, stops at once."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_python(STAGE / "train.py", "--config", "test", "--global_batch_size", "33", "--data_root", tiny_data,
                        "--out_dir", tmp_path / "run", cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, output_of(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --global_batch_size 33 is shared by 2 processes: choose a multiple of 2"
    ), output_of(result)


@pytest.mark.parametrize("difference", ["settings", "code"])
def test_ranks_started_with_different_settings_or_code_are_refused(difference, tmp_path, tiny_data):
    """Two processes started by hand, as two launchers might: rank 1 with another seed (it would learn from other
    batches than rank 0 believes), or from another copy of the stage whose train.py differs by one line (a node
    with an older checkout). Both stop with one line that names the difference."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29400 + os.getpid() % 500)}
    other_copy = shutil.copytree(REPO / "stages", tmp_path / "other" / "stages",
                                 ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    with open(other_copy / STAGE.name / "train.py", "a") as train_py:
        train_py.write("# an edit that only this copy has\n")
    seed_1, stage_1 = ("1", STAGE) if difference == "settings" else ("0", other_copy / STAGE.name)
    processes = []
    for rank, seed, stage in [(0, "0", STAGE), (1, seed_1, stage_1)]:
        command = [sys.executable, stage / "train.py", "--config", "test", "--seed", seed, "--data_root", tiny_data,
                   "--out_dir", tmp_path / "run"]  # fmt: skip
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        processes.append(start(command, cwd=tmp_path, env=rank_env, timeout=120, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE))  # fmt: skip
    named = "seed 1 there, 0 on rank 0)" if difference == "settings" else "code "
    expected = f"rank 1 would train another run than rank 0 ({named}"
    for rank, process in enumerate(processes):
        out, err = finish(process)
        assert process.returncode == 1 and "Traceback" not in err, f"rank {rank}: {out}{err}"
        assert expected in err.strip().splitlines()[-1], f"rank {rank}: {err}"
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained, nothing saved"


def test_the_meeting_point_under_srun_is_the_first_node_and_a_port_of_the_job(tmp_path, monkeypatch):
    """What distributed.py works out for an srun task: the step's first node (from scontrol, here a stand-in that
    expands the node list) and 15000 + job id % 15000; without scontrol, a one-line error that says what to set."""
    distributed = stage_module(STAGE, "distributed")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "nid[001004-001005]")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    with pytest.raises(distributed.common.UserError, match="export MASTER_ADDR=<it> before srun"):
        distributed.master_addr_from_slurm()
    scontrol = tmp_path / "scontrol"
    expand = 'printf "nid001004\\nnid001005\\n"'
    scontrol.write_text(f'#!/bin/sh\n[ "$*" = "show hostnames nid[001004-001005]" ] && {expand}\n')
    scontrol.chmod(0o755)
    distributed.master_addr_from_slurm()
    assert os.environ["MASTER_ADDR"] == "nid001004" and os.environ["MASTER_PORT"] == str(15000 + 123456 % 15000)


DDP_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "distributed.py").exists()]  # 06 on
DDP_ENDS = [DDP_STAGES[0], DDP_STAGES[-1]]  # distributed.py's copies are checked by tests/test_docs.py


@pytest.mark.parametrize("stage", DDP_ENDS, ids=[stage.name for stage in DDP_ENDS])
def test_a_dead_rank_gives_one_line_on_each_surviving_rank(stage, tmp_path, tiny_data):
    """SIGKILL to rank 1 of 2 (started by hand, as a launcher would, so that only our own output is seen): rank 0's
    next collective fails (gloo: the connection reset by the dead side); it ends with one line that says so and how
    to resume, not with gloo's traceback."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29900 + os.getpid() % 90),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    command = [sys.executable, stage / "train.py", "--config", "test", "--num_epochs", "20", "--data_root", tiny_data,
               "--out_dir", tmp_path / "run"]  # fmt: skip
    ranks = [start(command, cwd=tmp_path, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, timeout=120,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]  # fmt: skip
    read_until(ranks[0], "step 8/")
    ranks[1].kill()
    _, stderr = finish(ranks[0])
    finish(ranks[1])
    last_line = stderr.strip().splitlines()[-1]
    assert ranks[0].returncode == 1 and "Traceback" not in stderr, stderr
    assert last_line.startswith("error: another process of this run died or stopped answering (") and \
        last_line.endswith("run the same command to resume"), stderr  # fmt: skip


@pytest.mark.parametrize(("order", "expected"), [(None, [0, 1, 2, 3]), ("3,2,1,0", [3, 2, 1, 0])])
def test_each_local_rank_takes_the_gpu_the_job_script_orders(order, expected, monkeypatch):
    """TUTORIAL_GPU_ORDER (submit_pm.sh: 3,2,1,0 on Perlmutter, where GPU 3 is next to the cores of local rank 0)
    maps local ranks to CUDA devices; without it, local rank r takes device r. An order that is not one of the
    GPUs is refused."""
    distributed = stage_module(DDP_STAGES[-1], "distributed")
    if order:
        monkeypatch.setenv("TUTORIAL_GPU_ORDER", order)
    else:
        monkeypatch.delenv("TUTORIAL_GPU_ORDER", raising=False)
    assert [distributed.gpu_index(local_rank, 4) for local_rank in range(4)] == expected
    monkeypatch.setenv("TUTORIAL_GPU_ORDER", "3,2,1")
    with pytest.raises(common.UserError, match="TUTORIAL_GPU_ORDER=3,2,1 does not list each of the 4 GPUs"):
        distributed.gpu_index(0, 4)
