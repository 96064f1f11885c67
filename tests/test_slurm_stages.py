"""The submit scripts on a real (local, one-node) Slurm, with their Perlmutter flags as written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
from helpers import REPO, SCRIPT_STAGES, finish, output_of, read_until, run_python, stage_module, start
from slurm_fixture import FINISHED, job_field, submit, wait_for_job
from test_checkpoint import assert_same_weights, final_weights
from wandb_files import run_files, run_record

# Stage 02's script (one GPU, shared QOS) and the newest stage's run on Slurm. Stage 03 adds the requeue, which
# every later stage copies (tests/test_docs.py checks the copies); it is run below with the newest stage, whose
# script (stage 06 on) starts 4 processes on the fake 4-GPU node, with the Perlmutter flags as written.
SUBMIT_STAGES = [stage for stage in SCRIPT_STAGES if (stage / "submit_pm.sh").exists()]
SUBMIT_STAGES = list(dict.fromkeys([SUBMIT_STAGES[0], SUBMIT_STAGES[-1]]))
NEWEST = SUBMIT_STAGES[-1]
DISTRIBUTED = (NEWEST / "distributed.py").exists()
RESUME_BOUND_4_PROCESSES = 1e-5  # measured: 3e-8 (the final validation loss; the train loss the same to 8 digits)
# on the tiny preset (32x32), before the test config moved to micro (16x16)


def sbatch_wait(env, *arguments, cwd=REPO):
    """Submit (from the repository root, as the READMEs say), wait, and return (exit code, job output).
    Not `sbatch --wait`: it checks after 2, 6, 14, 30 and 62 s, so a 31-s job would take 62."""
    job_id = submit(env, *map(str, arguments), cwd=cwd)
    wait_for_job(env, job_id, timeout=600)
    code = int(job_field(env, job_id, "ExitCode").split(":")[0] or 1)
    outputs = list(REPO.glob(f"slurm-*-{job_id}.out"))
    text = "\n".join(path.read_text() for path in outputs)
    for path in outputs:
        path.unlink()
    return code, f"job {job_id} output:\n{text}"


@pytest.mark.parametrize("stage", SUBMIT_STAGES, ids=[s.name for s in SUBMIT_STAGES])
def test_submit_script_runs_a_stage(stage, local_slurm, tmp_path):
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    distributed = (stage / "distributed.py").exists()
    code, output = sbatch_wait(env, "-A", "tutorial", stage.relative_to(REPO) / "submit_pm.sh",
                               "--config", "test", "--out_dir", out_dir)  # fmt: skip
    assert code == 0, output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stage"] == stage.name and summary["settings"]["config"] == "test"
    assert summary["val_relative_l2"] < 1.0
    assert "environment: TUTORIAL_ENV=" in output and "done in" in output, output
    if distributed:
        assert summary["world_size"] == 4, "one process per (fake) GPU"
        assert output.count("done in") == 1 and output.count("first step:") == 1, "only rank 0 prints"
        assert all(f"rank {rank} (local rank {rank}) on " in output for rank in range(4)), "each says where it runs"


def test_submit_from_elsewhere_says_where_to_submit(local_slurm, tmp_path):
    script = REPO / "stages" / "02_script" / "submit_pm.sh"
    code, _ = sbatch_wait(local_slurm, "-o", tmp_path / "out.txt", script, cwd=tmp_path)
    assert code != 0
    assert "submit from the repository root" in (tmp_path / "out.txt").read_text()


def submit_and_wait_for_step(env, out_dir, arguments, step, script="submit_pm.sh", options=()):
    """Submit the newest stage's script from the repository root; return its job id once it has logged `step`."""
    job_id = submit(env, "-A", "tutorial", *options, f"--chdir={REPO}", NEWEST.relative_to(REPO) / script,
                    *map(str, arguments), "--out_dir", str(out_dir))  # fmt: skip
    log = out_dir / "train.log"
    deadline = time.monotonic() + 180
    while not (log.exists() and f"step {step}/" in log.read_text()):
        assert time.monotonic() < deadline and job_field(env, job_id, "JobState") not in FINISHED, "no progress"
        time.sleep(0.2)
    return job_id


def job_output(job_id, name=NEWEST.name):
    output_file = REPO / f"slurm-{name}-{job_id}.out"
    output = output_file.read_text()
    output_file.unlink()
    return output


def test_time_limit_signal_checkpoints_requeues_and_resumes(local_slurm, tmp_path, tiny_data):
    """The time-limit signal (sent on demand) makes the job checkpoint and requeue itself; the requeued job
    resumes and ends as an uninterrupted run (of as many processes, from stage 06 on: 4) ends. Bit for bit with
    one process. With 4, the first step after a resume groups the gradients for summing otherwise (DDP regroups
    them after the first step of every process), so the weights agree to rounding, not bit for bit: the final
    train and validation losses to RESUME_BOUND_4_PROCESSES. (With 2 processes resume is bit-exact: test_ddp.py.)"""
    arguments = ["--config", "test", "--num_epochs", "3", "--data_root", tiny_data]  # 48 steps, stopped after 16
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"] if DISTRIBUTED else []
    reference = run_python(*launcher, NEWEST / "train.py", *arguments, "--out_dir", tmp_path / "reference",
                           cwd=tmp_path)  # fmt: skip
    assert reference.returncode == 0, output_of(reference)

    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    job_id = submit_and_wait_for_step(env, out_dir, arguments, 16)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    state = wait_for_job(env, job_id, timeout=240)
    output = job_output(job_id)
    assert state == "COMPLETED", output
    assert job_field(env, job_id, "Restarts") == "1", output
    assert "SIGUSR1 received: saved" in output and "restart 1" in output and "resuming from" in output, output
    if not DISTRIBUTED:
        assert_same_weights(final_weights(out_dir), final_weights(tmp_path / "reference"))
    else:
        resumed, uninterrupted = (common.read_summary(folder) for folder in (out_dir, tmp_path / "reference"))
        assert resumed["world_size"] == uninterrupted["world_size"] == 4
        for key in ("final_train_loss", "final_val_loss"):
            print(f"{key}: {resumed[key]:.8g} resumed, {uninterrupted[key]:.8g} uninterrupted")
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=RESUME_BOUND_4_PROCESSES), key


@pytest.mark.skipif(not DISTRIBUTED, reason="from stage 06 on")
def test_a_dead_rank_ends_the_whole_job(local_slurm, tmp_path, tiny_data):
    """SIGKILL to rank 1 of 4: the ranks that talk to it fail at once, and srun ends the others 30 s after the
    first exit (srun --wait=30; a rank that hangs instead fails after ddp_timeout_s). The job ends failed,
    within 60 s, and is not requeued."""
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    arguments = ["--config", "test", "--num_epochs", "30", "--data_root", tiny_data]
    job_id = submit_and_wait_for_step(env, tmp_path / "run", arguments, 16)
    rank_1 = next(pid for pid in map(int, subprocess.run(["pgrep", "-f", f"{NEWEST.name}/train.py"],
                                                           capture_output=True, text=True).stdout.split())
                  if is_rank_of_job(pid, 1, job_id))  # fmt: skip
    os.kill(rank_1, signal.SIGKILL)
    killed_at = time.monotonic()
    state = wait_for_job(env, job_id, timeout=60)
    ended_after = time.monotonic() - killed_at
    output = job_output(job_id)
    print(f"the job ended {ended_after:.0f} s after rank 1 was killed, {state}")
    assert state == "FAILED" and job_field(env, job_id, "Restarts") == "0", output


def is_rank_of_job(pid, rank, job_id):
    """A training process (not one of its DataLoader workers) of `rank` in the job `job_id`."""
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        parent_command = open(f"/proc/{parent}/cmdline", "rb").read()
    except OSError:
        return False
    return (f"SLURM_PROCID={rank}".encode() in environ and f"SLURM_JOB_ID={job_id}".encode() in environ
            and b"slurmstepd" in parent_command)  # fmt: skip


FAKE_SRUN = """#!/bin/bash
# Stands in for `srun ... train.py`: runs until USR1, then exits with the code train.py would.
trap 'exit "$EXIT_AFTER_USR1"' USR1
echo "fake srun running"
while true; do sleep 0.05; done
"""


@pytest.mark.parametrize(("train_exit", "requeued"), [(3, True), (0, False), (1, False)])
def test_the_trap_requeues_only_a_run_that_stopped_early(train_exit, requeued, tmp_path):
    """USR1 near the time limit: requeue if train.py stopped early with a checkpoint (exit 3); if training had
    finished anyway (0) or failed (1), the job ends with that code and is not started again. Runs the batch
    script itself, with stand-ins for srun and scontrol, so the timing is exact."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol-calls"}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TUTORIAL_ENV": "none",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "42", "EXIT_AFTER_USR1": str(train_exit)}  # fmt: skip
    script = REPO / "stages" / "03_checkpoint_restart" / "submit_pm.sh"
    job = start(["bash", script], cwd=tmp_path, env=env, timeout=30, stdout=subprocess.PIPE)
    read_until(job, "fake srun running")
    job.send_signal(signal.SIGUSR1)
    output, _ = finish(job)
    assert job.returncode == train_exit, output
    calls = (tmp_path / "scontrol-calls").read_text() if (tmp_path / "scontrol-calls").exists() else ""
    assert calls == ("requeue 42\n" if requeued else ""), output


@pytest.mark.skipif(not (NEWEST / "submit_pm_torchrun.sh").exists(), reason="from stage 06 on")
def test_the_torchrun_variant_checkpoints_requeues_and_resumes_bit_exact(local_slurm, tmp_path, tiny_data):
    """submit_pm_torchrun.sh: one task on the node, whose torchrun starts one process per (fake) GPU (2 here, asked
    with --gpus-per-node=2, so that resume is bit-exact, as tests/test_ddp.py shows for 2 processes). The time-limit
    signal reaches the processes through torchrun (--signals-to-handle); they checkpoint and stop, torchrun exits
    with its own code, the job requeues itself and ends with the weights of an uninterrupted 2-process run."""
    arguments = ["--config", "test", "--num_epochs", "3", "--data_root", tiny_data]  # 48 steps, stopped after 16
    reference = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", NEWEST / "train.py",
                           *arguments, "--out_dir", tmp_path / "reference", cwd=tmp_path)  # fmt: skip
    assert reference.returncode == 0, output_of(reference)
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}"}
    out_dir = tmp_path / "run"
    job_id = submit_and_wait_for_step(env, out_dir, arguments, 16, "submit_pm_torchrun.sh", ["--gpus-per-node=2"])
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    state = wait_for_job(env, job_id, timeout=240)
    output = job_output(job_id, name=f"{NEWEST.name}_torchrun")
    assert state == "COMPLETED" and job_field(env, job_id, "Restarts") == "1", output
    assert "launcher torchrun" in output and "SIGUSR1 received: saved" in output and "requeueing job" in output, output
    assert "resuming from" in output.split("restart 1")[1], output
    assert common.read_summary(out_dir)["world_size"] == 2
    assert_same_weights(final_weights(out_dir), final_weights(tmp_path / "reference"))


FAKE_AGENT = """#!{python}
# Stands in for `wandb agent --count 1 <entity>/<project>/<sweep id>` as wandb 0.31's agent (wandb/wandb_agent.py)
# hands out one trial: it sets WANDB_ENTITY and WANDB_PROJECT from the sweep's path, WANDB_SWEEP_ID (the bare id),
# WANDB_DIR (the working directory, unless set), WANDB_RUN_ID, and WANDB_SWEEP_PARAM_PATH (the trial's parameters,
# written to <WANDB_DIR>/wandb/sweep-<id>/config-<run id>.yaml); then it runs the sweep's command,
# `/usr/bin/env python <program> --key=value...`, in its working directory, and exits 0 whatever the trial's exit
# code. Each call is recorded.
import os, subprocess, sys
assert sys.argv[1:4] == ["agent", "--count", "1"], sys.argv
with open(os.environ["FAKE_AGENT_CALLS"], "a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
entity, project, sweep_id = sys.argv[4].split("/")
run_id = os.environ["FAKE_RUN_ID"]
arguments = os.environ["FAKE_TRIAL_ARGUMENTS"].split()
os.environ.update(WANDB_ENTITY=entity, WANDB_PROJECT=project, WANDB_SWEEP_ID=sweep_id)
os.environ.setdefault("WANDB_DIR", os.getcwd())
parameters = os.path.join(os.environ["WANDB_DIR"], "wandb", f"sweep-{{sweep_id}}", f"config-{{run_id}}.yaml")
os.makedirs(os.path.dirname(parameters), exist_ok=True)
with open(parameters, "w") as file:
    file.write("".join(f"{{a[2:].split('=')[0]}}:\\n  value: {{a.split('=', 1)[1]}}\\n" for a in arguments))
os.environ.update(WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=parameters)
subprocess.run(["/usr/bin/env", "python", "{program}", *arguments])
"""


@pytest.mark.skipif(not (NEWEST / "submit_sweep_pm.sh").exists(), reason="from stage 08 on")
def test_an_interrupted_sweep_trial_continues_from_its_own_checkpoint_after_a_requeue(local_slurm, tmp_path,
                                                                                      tiny_data):  # fmt: skip
    """submit_sweep_pm.sh with 4 processes; a stand-in for the W&B agent hands rank 0 a trial (there is no W&B
    server here). The time-limit signal stops the trial, the job requeues itself, and the requeued job continues
    the same trial from its checkpoint, without asking the agent again: one call to the agent, one trial run to
    its end, and W&B (offline) with two pieces of the trial's run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = NEWEST.relative_to(REPO) / "train.py"  # the sweep file's `program`, which the agent runs
    assert f"program: {program}" in (NEWEST / "sweep.yaml").read_text()
    (bin_dir / "wandb").write_text(FAKE_AGENT.format(python=sys.executable, program=program))
    (bin_dir / "wandb").chmod(0o755)
    calls = tmp_path / "agent-calls"
    trial_arguments = (f"--config=test --wandb_mode=offline --num_epochs=4 --base_lr=0.001 --global_batch_size=64 "
                       f"--data_root={tiny_data}")
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), local_slurm["PATH"]])
    # TUTORIAL_ENV=none: the Python first on PATH (this one), and no venv activation that would put the real
    # wandb ahead of the stand-in.
    # The user's own W&B defaults differ from the sweep's project and entity: the trial must log to the sweep's.
    env = {**local_slurm, "PATH": path, "TUTORIAL_ENV": "none", "WANDB_MODE": "offline", "FAKE_AGENT_CALLS": str(calls),
           "FAKE_RUN_ID": "trial42", "FAKE_TRIAL_ARGUMENTS": trial_arguments, "WANDB_PROJECT": "my-default-project",
           "WANDB_ENTITY": "my-default-entity"}  # fmt: skip
    sweeps = stage_module(NEWEST, "sweeps")
    name = sweeps.trial_name(trial_arguments.split())  # test_num_epochs4_lr1e-3_gbs64
    trial_dir = sweeps.sweep_folder("me/project/fakesweep") / f"{name}-trial42"
    job_id = submit(env, "-A", "tutorial", f"--chdir={REPO}", NEWEST.relative_to(REPO) / "submit_sweep_pm.sh",
                    "me/project/fakesweep")  # fmt: skip
    log = trial_dir / "train.log"
    deadline = time.monotonic() + 180
    while not (log.exists() and "step 16/" in log.read_text()):
        if time.monotonic() > deadline or job_field(env, job_id, "JobState") in FINISHED:
            state, output = job_field(env, job_id, "JobState"), job_output(job_id, name=f"{NEWEST.name[:2]}_sweep")
            pytest.fail(f"no progress: {state}\n{output}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    state = wait_for_job(env, job_id, timeout=240)
    output = job_output(job_id, name=f"{NEWEST.name[:2]}_sweep")
    assert state == "COMPLETED" and job_field(env, job_id, "Restarts") == "1", output
    assert calls.read_text().splitlines() == ["agent --count 1 me/project/fakesweep"], "the agent, once"
    assert "SIGUSR1 received: saved" in output and "requeued: continuing the trial" in output, output
    summary = common.read_summary(trial_dir)
    assert summary["world_size"] == 4 and summary["steps"] == 32 and summary["settings"]["base_lr"] == 0.001
    trial = json.loads((sweeps.sweep_folder("me/project/fakesweep") / "trials" / f"{job_id}.json").read_text())
    assert trial["exit_code"] == 0 and trial["name"] == name == "test_num_epochs4_lr1e-3_gbs64"
    pieces = run_files(trial_dir)
    assert len(pieces) == 2, "the first attempt and the continued one, both of the trial's W&B run"
    for piece in pieces:  # the requeued one too, though no agent set the variables then
        run = run_record(piece)
        assert (run["id"], run["project"], run["entity"], run["sweep_id"]) == ("trial42", "project", "me", "fakesweep")
    assert not (REPO / "wandb").exists(), "the agent's files are in the sweep's folder, not in the repository"
    assert list(sweeps.sweep_folder("me/project/fakesweep").glob("wandb/sweep-fakesweep/config-trial42.yaml"))
    print(output)  # the job's log, for the record


RECORDING_SRUN = """#!/bin/bash
# Stands in for srun: records its arguments and the GPU order the tasks would get, then ends.
echo "srun $* | TUTORIAL_GPU_ORDER=${TUTORIAL_GPU_ORDER:-}" >> "$RECORD"
"""


@pytest.mark.skipif(not DISTRIBUTED, reason="from stage 06 on")
@pytest.mark.parametrize("script", ["submit_pm.sh", "submit_pm_torchrun.sh"])
def test_the_scripts_bind_each_process_next_to_its_gpu_and_do_not_depend_on_kill_on_bad_exit(script, tmp_path):
    """What the multi-GPU scripts pass to srun, with stand-ins for srun, scontrol and nvidia-smi (a GPU node): under
    srun, each task bound to its cores and the reversed GPU order of a Perlmutter node; under torchrun, torchrun's
    own NUMA binding and USR1 passed on (where the installed torchrun has them). Both set --kill-on-bad-exit=0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(RECORDING_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho nid001\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
           "TUTORIAL_ENV": "none", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "nid001",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "4", "RECORD": str(tmp_path / "record")}  # fmt: skip
    result = subprocess.run(["bash", NEWEST / script, "--config", "quick"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [call] = (tmp_path / "record").read_text().splitlines()
    assert "--kill-on-bad-exit=0" in call and "--wait=30" in call, call
    if script == "submit_pm.sh":
        assert "--cpu-bind=cores" in call and call.endswith("TUTORIAL_GPU_ORDER=3,2,1,0"), call
    else:
        assert "--numa-binding=node" in call and "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in call
        assert call.endswith("TUTORIAL_GPU_ORDER="), "torchrun binds rank r next to GPU r: no reordering"


def test_the_container_gets_the_gpu_order_and_slurms_variables(tmp_path):
    """podman-hpc passes only the variables it is told to: the GPU order of submit_pm.sh must reach the container."""
    script = 'source slurm/setup_env.sh > /dev/null; printf "%s\\n" "${TUTORIAL_PYTHON[@]}"'
    env = {**os.environ, "TUTORIAL_ENV": "podman", "TUTORIAL_IMAGE": "registry/tutorial:1"}
    words = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    passed = [words[i + 1] for i, word in enumerate(words) if word == "-e"]
    assert {"SLURM_*", "MASTER_*", "TUTORIAL_*"} <= set(passed), words


def test_the_scaling_script_measures_the_all_reduce_and_profiles_the_step(local_slurm, tmp_path):
    """Stage 09's submit_scaling_pm.sh as written (4 tasks on the fake 4-GPU node, so gloo on the CPU): the all-reduce
    of 4 processes, then a profiled epoch, under $SCRATCH. (NCCL's network lines need GPUs: not seen here.)"""
    env = {**local_slurm, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{local_slurm['PATH']}",
           "SCRATCH": str(tmp_path), "TUTORIAL_BENCH_SIZES": "4KB,1MB"}  # fmt: skip
    script = REPO / "stages" / "09_scaling" / "submit_scaling_pm.sh"
    code, output = sbatch_wait(env, "-A", "tutorial", script.relative_to(REPO), "--config", "test", "--profile_steps",
                               "6-10")  # fmt: skip
    assert code == 0, output
    [folder] = (tmp_path / REPO.name / "runs" / "09_scaling").glob("scaling-1node-*")
    assert "all_reduce of float32 with gloo: 4 processes on 1 node(s)" in output, output
    assert json.loads((folder / "allreduce.json").read_text())["world_size"] == 4
    assert "profile of steps 6-10, mean over 4 rank(s)" in output, output
    breakdown = json.loads((folder / "train" / "profile" / "breakdown.json").read_text())
    assert breakdown["world_size"] == 4 and breakdown["allreduce_whole_s"] > 0, breakdown
    assert sorted(path.name for path in (folder / "train" / "profile").glob("trace-rank*.json")) == [
        f"trace-rank{rank}.json" for rank in range(4)]  # fmt: skip
    assert f"--allreduce {folder}/allreduce.json" in output, output
