"""Stage 08, W&B with no network and no W&B server: what is written offline (read back from its files), the
hand-off of a sweep trial to every rank, the mode chosen when online cannot work, the sweep files, and the
offline grid. (A trial requeued on Slurm continues from its checkpoint: tests/test_slurm_stages.py.)"""

import functools
import itertools
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

import common
from helpers import REPO, finish, output_of, run, run_python, stage_module, start
from wandb_files import history, run_files, run_record

STAGE = REPO / "stages" / "08_wandb_sweeps"
NO_LOGIN = {"NETRC": "/nonexistent/netrc"}  # no ~/.netrc login, whatever this machine has
WELL_FORMED_KEY = "0123456789abcdef" * 3  # 48 characters of the right kind: only a server could refuse it


def environment(**extra):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    return {**env, **NO_LOGIN, **extra}


def train(out_dir, data_root, *extra, env=None, nproc=1, timeout=180):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc] if nproc > 1 else []
    command = [sys.executable, *launcher, STAGE / "train.py", "--config", "test", "--data_root", data_root,
               "--out_dir", out_dir, *extra]  # fmt: skip
    return run(command, cwd=out_dir.parent, env=env or environment(), timeout=timeout)


def test_offline_run_holds_the_metrics_and_only_rank_0_writes(tmp_path, tiny_data):
    """2 gloo processes, no W&B login: the run goes offline and says so; one offline run, rank 0's, whose history
    (read back from its file) holds every metric TensorBoard got, at the same steps, and a prediction image."""
    out_dir = tmp_path / "run"
    result = train(out_dir, tiny_data, "--wandb_mode", "auto", "--wandb_image_every", "16", nproc=2)
    assert result.returncode == 0, output_of(result)
    assert "W&B: no W&B credentials here" in result.stdout and "logging offline" in result.stdout, output_of(result)
    assert f"wandb sync {out_dir}/wandb/offline-run-*" in result.stdout
    [piece] = run_files(out_dir)
    assert not list(tmp_path.glob("wandb")) and not (REPO / "wandb").exists(), "W&B wrote only into the run folder"
    rows = history(piece)
    tags = ["train/loss", "train/lr", "perf/samples_per_s", "perf/data_wait_share", "val/loss", "val/relative_l2"]
    for tag in tags:  # every value TensorBoard got (the mean over the ranks), at its step, and nothing else
        in_wandb = {row["trainer/step"]: row[tag] for row in rows if tag in row}
        in_tensorboard = {step: value for step, _, value in common.scalar_curve(out_dir, tag)}
        assert in_wandb.keys() == in_tensorboard.keys(), (tag, sorted(in_wandb), sorted(in_tensorboard))
        assert in_wandb == pytest.approx(in_tensorboard, rel=1e-6), tag  # TensorBoard keeps float32
    assert sorted(row["trainer/step"] for row in rows if "train/loss" in row) == [8, 16, 24, 32]
    assert sorted(row["trainer/step"] for row in rows if "val/loss" in row) == [16, 32]
    images = [row for row in rows if row.get("val/delta_truth_prediction_error/_type") == "image-file"]
    assert [row["trainer/step"] for row in images] == [16, 32], "an image every 16 steps, at validation"
    run = run_record(piece)
    assert run["name"] == "08_wandb_sweeps-test" and run["config"]["base_lr"] == 0.002, run


def test_the_prediction_image_follows_the_step():
    """An image at the run's first validation, then at the first validation after every wandb_image_every steps,
    whatever the process that logs it (a resumed run keeps the rhythm). The offline run above cannot tell: its
    images are due at every validation."""
    tracking = stage_module(STAGE, "tracking")
    validations = range(16, 1601, 16)  # 16 steps per epoch, an image every 500 steps
    assert [step for step in validations if tracking.image_due(step, 500, 16)] == [16, 512, 1008, 1504]
    validations = range(40, 201, 40)  # 40 steps per epoch, an image every 16: due at every validation
    assert all(tracking.image_due(step, 16, 40) for step in validations)


def test_a_run_resumed_offline_is_a_second_piece_of_the_same_run(tmp_path, tiny_data):
    """W&B cannot resume an offline run: the resumed one is a second offline piece with the same run id (from the
    checkpoint), whose history starts after the checkpoint; `wandb sync` uploads both."""
    out_dir = tmp_path / "run"
    stopped = train(out_dir, tiny_data, "--wandb_mode", "offline", "--signal_at_step", "12")
    assert stopped.returncode == 3, output_of(stopped)
    resumed = train(out_dir, tiny_data, "--wandb_mode", "offline")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, output_of(resumed)
    first, second = run_files(out_dir)
    assert run_record(first)["id"] == run_record(second)["id"]
    steps = [[row["trainer/step"] for row in history(piece) if "train/loss" in row] for piece in (first, second)]
    assert steps == [[8], [16, 24, 32]], steps


def test_a_trial_as_the_agent_delivers_it_reaches_every_rank(tmp_path, tiny_data):
    """The agent starts rank 0 only, with the trial's --key=value arguments and WANDB_SWEEP_ID / WANDB_RUN_ID;
    rank 1 starts with no settings at all. Rank 0 saves the trial and sends it to rank 1; both train it (they
    check that they run the same settings before the first step), and the trial is named from its parameters."""
    port = str(29500 + os.getpid() % 500)
    env = environment(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WANDB_MODE="offline")
    agent_env = {**env, "RANK": "0", "LOCAL_RANK": "0", "WANDB_SWEEP_ID": "fakesweep", "WANDB_RUN_ID": "trial123"}
    trial_arguments = ["--config=test", "--base_lr=0.001", "--global_batch_size=64", "--wandb_mode=offline",
                       f"--data_root={tiny_data}"]
    ranks = [start([sys.executable, STAGE / "train.py", *trial_arguments], env=agent_env, cwd=tmp_path, timeout=120,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             start([sys.executable, STAGE / "train.py"], env={**env, "RANK": "1", "LOCAL_RANK": "1"}, cwd=tmp_path,
                   timeout=120, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]  # fmt: skip
    outputs = [finish(rank)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(outputs)
    sweep = stage_module(STAGE, "sweeps").sweep_folder("fakesweep")
    out_dir = sweep / "test_lr1e-3_gbs64-trial123"
    summary = common.read_summary(out_dir)
    assert summary["world_size"] == 2 and summary["settings"]["base_lr"] == 0.001
    assert summary["settings"]["global_batch_size"] == 64
    trial = yaml.safe_load((sweep / "trials" / "trial123.json").read_text())
    assert trial["name"] == "test_lr1e-3_gbs64" and trial["exit_code"] == 0 and trial["run_id"] == "trial123"
    [piece] = run_files(out_dir)
    assert run_record(piece)["id"] == "trial123" and run_record(piece)["name"] == "test_lr1e-3_gbs64"


def test_trial_names_come_from_the_parameters():
    sweeps = stage_module(STAGE, "sweeps")
    assert sweeps.trial_name(["--config=bs64", "--base_lr=0.001", "--global_batch_size=256"]) == "bs64_lr1e-3_gbs256"
    assert sweeps.trial_name(["--base_lr=0.0025", "--seed=3"]) == "lr2.5e-3_seed3"


@pytest.fixture
def listening_port():
    """A local port that accepts connections and never answers: a W&B server that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


ONLINE_CASES = {  # what W&B is given -> what the run must say (auto: fall back; online: fail with that line)
    "no network": (lambda port: {"WANDB_API_KEY": WELL_FORMED_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"},
                   "does not answer from this node"),
    "malformed key": (lambda port: {"WANDB_API_KEY": "not a key!", "WANDB_BASE_URL": f"http://127.0.0.1:{port}"},
                      "could not start online"),
}  # fmt: skip
BOUND_S = 60  # the server check waits 5 s, W&B's own start up to WANDB_INIT_TIMEOUT (here 10 s): well within


@pytest.mark.parametrize(("case", "mode"), [("no network", "auto"), ("no network", "online"),
                                           ("malformed key", "auto"), ("malformed key", "online")])  # fmt: skip
def test_online_without_network_or_with_a_malformed_key_ends_in_time(case, mode, tmp_path, tiny_data,
                                                                     listening_port):  # fmt: skip
    """auto goes offline with one line saying why; online stops with a one-line error. Either way within BOUND_S,
    and the key appears in no output and no file. (A wrong key of the right form needs the W&B server to refuse
    it: not tested here.)"""
    settings, message = ONLINE_CASES[case]
    port = closed_port() if case == "no network" else listening_port
    env = environment(**settings(port), WANDB_INIT_TIMEOUT="10")
    out_dir = tmp_path / "run"
    started = time.monotonic()
    result = train(out_dir, tiny_data, "--wandb_mode", mode, "--num_epochs", "1", env=env, timeout=BOUND_S + 60)
    took = time.monotonic() - started
    print(f"{case}, {mode}: ended after {took:.0f} s with exit code {result.returncode}")
    assert took < BOUND_S, f"took {took:.0f} s"
    if mode == "auto":
        assert result.returncode == 0 and message in result.stdout and "logging offline" in result.stdout, \
            output_of(result)
        assert len(run_files(out_dir)) == 1
    else:
        last_line = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and last_line.startswith("error: ") and message in last_line, output_of(result)
    key = settings(port)["WANDB_API_KEY"]
    assert key not in result.stdout + result.stderr
    for path in out_dir.rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), f"the key is in {path}"


SWEEP_FILES = [STAGE / "sweep.yaml", STAGE / "sweep_random.yaml"]


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda path: path.name)
def test_sweep_files_name_only_settings_that_train_py_has_with_valid_values(sweep_file):
    train_module = stage_module(STAGE)
    sweep = yaml.safe_load(sweep_file.read_text())
    assert (REPO / sweep["program"]).exists() and "${args}" in sweep["command"]
    assert f'"{sweep["metric"]["name"]}"' in (STAGE / "train.py").read_text(), "the metric is one train.py logs"
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec[k] for k in ("value", "min", "max") if k in spec]
        assert values, f"{key}: no values"
        for value in values:  # each value as the agent passes it: --key=value
            cfg = train_module.common.load_config(STAGE / "config.yaml", [f"--{key}={value}"])
            assert getattr(cfg, key) == value


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=lambda path: path.name)
def test_a_sweep_compares_batches_at_comparable_steps_not_at_the_same_epochs(sweep_file):
    """Stage 07's pitfall: at the same epochs a larger batch takes fewer steps and loses for that reason alone. A
    sweep varies the batch only through stage 07's configs, each with its epochs: the steps of its trials are
    within a factor of 1.25 of each other."""
    parameters = yaml.safe_load(sweep_file.read_text())["parameters"]
    assert "global_batch_size" not in parameters and "num_epochs" not in parameters
    steps = []
    for name in parameters["config"]["values"]:
        cfg = common.load_config(STAGE / "config.yaml", ["--config", name])
        steps.append(cfg.num_epochs * (common.PRESETS[cfg.data_preset]["n_train"] // cfg.global_batch_size))
    assert len(steps) > 1 and max(steps) <= 1.25 * min(steps), dict(zip(parameters["config"]["values"], steps))


def test_the_offline_grid_maps_array_indices_to_exactly_the_grid_points(tmp_path):
    sweeps = stage_module(STAGE, "sweeps")
    parameters = yaml.safe_load((STAGE / "sweep.yaml").read_text())["parameters"]
    expected = {tuple(f"--{key}={value}" for key, value in zip(parameters, point))
                for point in itertools.product(*[p.get("values", [p.get("value")]) for p in parameters.values()])}
    points = [sweeps.grid_arguments(STAGE / "sweep.yaml", index) for index in range(len(expected))]
    assert {tuple(point[: len(parameters)]) for point in points} == expected, "every point once, nothing else"
    assert len({point[point.index("--out_dir") + 1] for point in points}) == len(expected), "a folder each"
    assert all("--wandb_mode" in point and point[point.index("--wandb_mode") + 1] == "offline" for point in points)
    with pytest.raises(common.UserError, match=f"has {len(expected)} points"):
        sweeps.grid_arguments(STAGE / "sweep.yaml", len(expected))
    result = run_python(STAGE / "sweeps.py", "grid", STAGE / "sweep.yaml", "--index", "1", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.splitlines() == points[1], output_of(result)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--wandb_project", "my/project", "Invalid project name 'my/project'"),
    ("--wandb_run_id", "run/1", "Run ID cannot contain the characters"),
])  # fmt: skip
def test_a_name_w_and_b_refuses_is_one_line_before_training(option, value, message, tmp_path, tiny_data):
    result = train(tmp_path / "run", tiny_data, "--wandb_mode", "offline", option, value)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert last_line.startswith("error: W&B refuses these settings (") and message in last_line, last_line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_w_and_b_variables_set_the_settings_below_the_command_line(tmp_path, tiny_data, monkeypatch):
    """WANDB_MODE, WANDB_PROJECT, ... as W&B documents them: they win over config.yaml, the command line over them.
    WANDB_MODE=disabled was ignored: an offline run was written (and with a key it went online)."""
    train_module, tracking = stage_module(STAGE), stage_module(STAGE, "tracking")
    load = functools.partial(common.load_config, STAGE / "config.yaml", renamed=train_module.RENAMED,
                             environment=tracking.ENVIRONMENT)  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "their-project")
    cfg = load(["--config", "quick"])
    assert (cfg.wandb_mode, cfg.wandb_project) == ("disabled", "their-project")
    assert load(["--config", "quick", "--wandb_mode", "offline"]).wandb_mode == "offline"
    out_dir = tmp_path / "run"
    result = train(out_dir, tiny_data, "--config", "quick", "--num_epochs", "1",
                   env=environment(WANDB_MODE="disabled"))  # fmt: skip
    assert result.returncode == 0 and "W&B disabled (WANDB_MODE=disabled in the environment)" in result.stdout, \
        output_of(result)  # fmt: skip
    assert not (out_dir / "wandb").exists() and not run_files(out_dir)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "is missing"),
    ('{"sweep_id": "s", "run_id": ', "cannot be read"),
    ('{"sweep_id": "s", "run_id": "r", "name": "n"}', "is incomplete (no arguments, wandb)"),
])  # fmt: skip
def test_a_broken_trial_file_is_one_line(content, problem, tmp_path, tiny_data):
    path = tmp_path / "trial.json"
    if content is not None:
        path.write_text(content)
    result = train(tmp_path / "run", tiny_data, "--trial_file", path)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert last_line.startswith(f"error: the sweep trial file {path} {problem}") and "submit again" in last_line


@pytest.mark.parametrize(("content", "problem"), [
    ("program: train.py\nparameters: [unclosed\n", "cannot read the sweep file"),
    ("program: train.py\nmethod: grid\n", "is not a grid sweep (found no 'parameters')"),
    ("parameters:\n  base_lr:\n    min: 0.001\n", "is not a grid sweep (found no 'value')"),
    ("parameters:\n  base_lr:\n    values: []\n", "every parameter needs a non-empty list"),
])  # fmt: skip
def test_a_broken_sweep_file_given_to_the_offline_grid_is_one_line(content, problem, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(content)
    result = run_python(STAGE / "sweeps.py", "grid", path, "--index", "0", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and problem in result.stderr, output_of(result)


def test_w_and_b_starting_slowly_does_not_spend_the_other_ranks_timeout(tmp_path, tiny_data, listening_port):
    """A W&B server that accepts the connection and never answers (wandb.init waits up to 90 s): with
    --ddp_timeout_s 30, rank 1 waits for rank 0 in a collective meanwhile. W&B gets a quarter of that timeout to
    answer (half of the half it has to start), goes offline, and both ranks train on, to the stop at step 4. (With
    8 s, starting W&B's service and then its offline run took 10 s on a busy CI machine: the 30 s leave room for
    that, and are still a third of the 90 s wandb.init would wait without the limit.)"""
    env = environment(WANDB_API_KEY=WELL_FORMED_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{listening_port}")
    out_dir = tmp_path / "run"
    result = train(out_dir, tiny_data, "--wandb_mode", "auto", "--ddp_timeout_s", "30", "--signal_at_step", "4",
                   env=env, nproc=2, timeout=120)  # fmt: skip
    # both ranks met at step 4 and saved (torchrun reports the ranks' exit code 3 as its own 1)
    assert "at step 4;" in result.stdout and "error:" not in result.stderr, output_of(result)
    assert (out_dir / "checkpoints" / "step-00000004.pt").exists()
    assert "W&B could not start online" in result.stdout and "logging offline" in result.stdout, output_of(result)
    assert len(run_files(out_dir)) == 1


def test_a_branch_from_an_older_checkpoint_is_a_new_w_and_b_run(tmp_path, tiny_data):
    """W&B keeps one value per step of a run: the steps a branch logs again below the old run's last would be
    dropped. So a branch is a run of its own (offline here, as online), and its checkpoints name it."""
    out_dir = tmp_path / "run"
    assert train(out_dir, tiny_data, "--wandb_mode", "offline", "--signal_at_step", "12").returncode == 3
    older = out_dir / "checkpoints" / "step-00000004.pt"
    branch = train(out_dir, tiny_data, "--wandb_mode", "offline", "--resume", older, "--signal_at_step", "16")
    assert branch.returncode == 3 and "a new branch" in branch.stdout, output_of(branch)
    first, second = (run_record(piece)["id"] for piece in run_files(out_dir))
    assert first != second
    assert torch.load(out_dir / "checkpoints" / "step-00000016.pt", weights_only=True)["wandb_run_id"] == second
    steps = [row["trainer/step"] for row in history(run_files(out_dir)[1]) if "train/loss" in row]
    assert steps == [8, 16], steps


def test_without_the_wandb_package_the_run_stops_with_one_line(tmp_path, tiny_data):
    """A kernel or module without wandb (a wandb that fails to import stands in for it, first on the path)."""
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text('raise ImportError("No module named wandb")\n')
    result = train(tmp_path / "run", tiny_data, "--wandb_mode", "offline",
                   env=environment(PYTHONPATH=str(tmp_path / "fake")))  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, output_of(result)
    assert result.stderr.strip().splitlines()[-1].startswith("error: W&B's package cannot be imported here")
