"""W&B sweeps for train.py (stage 08's concept): one trial per Slurm job, on every rank, surviving a requeue.

    python stages/10_diagnose/sweeps.py task <sweep_id>      # what each srun task of submit_sweep_pm.sh runs
    python stages/10_diagnose/sweeps.py grid sweep.yaml      # the grid's points, numbered (offline job arrays)
    python stages/10_diagnose/sweeps.py grid sweep.yaml --index 3   # train.py's arguments for point 3, offline

A trial's settings come from the W&B agent, as `--key=value` arguments, to one process (rank 0); rank 0 sends
them to every rank. Before training, rank 0 saves them in a trial file named after the Slurm job, with the W&B
variables the agent set for it (the sweep, its project and entity, the run id). A requeued job (the same job id)
finds that file and trains the same trial again, from its own checkpoint, instead of asking the agent, which
would hand out a new trial; it sets those variables again, so that the trial's W&B run continues in the sweep's
project, as inside the agent (there, wandb.init ignores its own project, entity and id arguments).
"""

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
import yaml

STAGE = Path(__file__).resolve().parent
sys.path.insert(0, str(STAGE.parent))  # find `common` from any working directory
import common

SHORT_NAMES = {"base_lr": "lr", "global_batch_size": "gbs"}  # trial names such as bs256_lr1e-3
# What `wandb agent` sets for the trial it starts (wandb/wandb_agent.py), which a requeued trial needs again
AGENT_VARIABLES = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY")


def trial_name(arguments):
    """A name from a trial's --key=value arguments: the config's name and the numbers (other words and paths name
    no trial apart): --config=bs256 --base_lr=0.001 gives bs256_lr1e-3, --base_lr=0.0025 --seed=3 lr2.5e-3_seed3."""
    parts = []
    for argument in arguments:
        key, value = argument.removeprefix("--").split("=", 1)
        if key == "config":
            parts.append(value)
        elif short_number(value):
            parts.append(f"{SHORT_NAMES.get(key, key)}{short_number(value)}")
    return "_".join(parts) or "trial"


def short_number(text):
    """0.001 -> 1e-3, 0.0025 -> 2.5e-3, 256 -> 256; None if text is not a number."""
    try:
        number = float(text)
    except ValueError:
        return None
    if text.lstrip("-").isdigit():
        return text
    mantissa, exponent = f"{number:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def sweep_folder(sweep_id):
    """Where a sweep's trials go: runs/10_diagnose/sweep-<id> (under $SCRATCH on Perlmutter)."""
    return common.output_root("runs", default=Path("runs")) / STAGE.name / f"sweep-{sweep_id.replace('/', '-')}"


def trial_file(sweep_id, job):
    return sweep_folder(sweep_id) / "trials" / f"{job}.json"


def new_trial(arguments):
    """Rank 0, started by the W&B agent (WANDB_SWEEP_ID and WANDB_RUN_ID are set, the trial's settings are its
    --key=value arguments): save the trial, keyed by the Slurm job (or, outside Slurm, by the W&B run)."""
    sweep_id, run_id = agent_sweep_path(), os.environ["WANDB_RUN_ID"]
    settings = [argument for argument in arguments if argument.startswith("--") and "=" in argument]
    name = trial_name(settings)
    path = trial_file(sweep_id, os.environ.get("SLURM_JOB_ID", run_id))
    out_dir = sweep_folder(sweep_id) / f"{name}-{run_id}"
    extra = ["--out_dir", str(out_dir), "--wandb_run_id", run_id, "--wandb_name", name, "--trial_file", str(path)]
    wandb_variables = {name: os.environ[name] for name in AGENT_VARIABLES if name in os.environ}
    trial = {"sweep_id": sweep_id, "run_id": run_id, "name": name, "arguments": settings + extra,
             "wandb": wandb_variables}  # fmt: skip
    write_trial(path, trial)
    return trial


def agent_sweep_path():
    """The sweep the agent started this trial of, as <entity>/<project>/<id> (the agent sets WANDB_SWEEP_ID to the
    bare id, and WANDB_ENTITY and WANDB_PROJECT from the sweep path it was given); the bare id if it set no project."""
    parts = [os.environ.get("WANDB_ENTITY"), os.environ.get("WANDB_PROJECT"), os.environ["WANDB_SWEEP_ID"]]
    return "/".join(parts) if all(parts) else parts[-1]


def read_trial(path):
    """A trial file, whole, or a UserError that says what is wrong with it and what to do."""
    fix = ("it is written when the W&B agent starts a trial; to let the job ask the agent for a new trial instead, "
           "move it away and submit again")  # fmt: skip
    try:
        trial = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise common.UserError(f"the sweep trial file {path} is missing: {fix}") from None
    except (OSError, ValueError) as error:
        raise common.UserError(f"the sweep trial file {path} cannot be read ({error}): {fix}") from None
    missing = [key for key in ("sweep_id", "run_id", "name", "arguments", "wandb") if key not in trial]
    if missing or not isinstance(trial.get("arguments"), list):
        raise common.UserError(f"the sweep trial file {path} is incomplete (no {', '.join(missing) or 'arguments'}): "
                               f"{fix}")  # fmt: skip
    return trial


def write_trial(path, trial):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(trial, indent=2) + "\n")
    tmp.replace(path)  # atomic: a requeued job reads the whole file or none


def this_trial(cfg, arguments, rank):
    """The sweep trial this process group trains, the same on every rank, or None (not a sweep). Call it on
    every rank at once: rank 0 finds the trial (its trial file after a requeue, else the agent's arguments) and
    sends it to the others."""
    trial = None
    if rank == 0 and cfg.trial_file:
        trial = {**read_trial(cfg.trial_file), "exit_code": None}
        write_trial(Path(cfg.trial_file), trial)  # this attempt has not ended yet
        os.environ.update(trial["wandb"])  # the trial's W&B run continues in its sweep, as inside the agent
    elif rank == 0 and "WANDB_SWEEP_ID" in os.environ:
        trial = new_trial(arguments)
    if dist.is_initialized():
        box = [trial]
        dist.broadcast_object_list(box, src=0)
        trial = box[0]
    return trial


def record_exit_code(cfg, code):
    """Rank 0, at the end of an attempt: 0 finished, 3 stopped early to be resumed (the job requeues itself)."""
    if cfg.trial_file:
        write_trial(Path(cfg.trial_file), {**read_trial(cfg.trial_file), "exit_code": code})


def run_task(sweep_id):
    """What each srun task of a sweep job runs. Rank 0: at the job's first start, the W&B agent, for one trial
    (it starts train.py with the trial's arguments); after a requeue, train.py on that job's trial. The others:
    train.py, which waits for rank 0 to send the trial."""
    if sweep_id.count("/") != 2:
        raise common.UserError(f"sweep {sweep_id!r}: give it as <entity>/<project>/<sweep_id>, as `wandb sweep` "
                               "prints it: its trials then log to the sweep's project, whatever your defaults")
    train = [sys.executable, str(STAGE / "train.py")]
    if os.environ.get("SLURM_PROCID", "0") != "0":
        os.execv(sys.executable, train)
    path = trial_file(sweep_id, os.environ.get("SLURM_JOB_ID", "local"))
    if path.exists():
        print(f"requeued: continuing the trial of {path}", flush=True)
        os.execv(sys.executable, [*train, "--trial_file", str(path)])
    # Slurm signals every process of the step: the trial's train.py handles the signals; the agent (and this
    # process, which waits for it) must not die of them. Ignoring is inherited; train.py sets its own handlers.
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    # The agent writes wandb/sweep-<id>/ under WANDB_DIR, else in the working directory (the repository): keep it
    # in the sweep's folder
    path.parent.mkdir(parents=True, exist_ok=True)
    agent = subprocess.run(["wandb", "agent", "--count", "1", sweep_id],
                           env={**os.environ, "WANDB_DIR": str(sweep_folder(sweep_id))})  # fmt: skip
    if not path.exists():
        sys.exit(f"error: the W&B agent (exit code {agent.returncode}) started no trial of sweep {sweep_id}: "
                 "is the sweep finished or stopped? (its page on W&B says)")  # fmt: skip
    code = read_trial(path).get("exit_code")
    sys.exit(1 if code is None else code)  # the trial's own exit code (the agent's says nothing of it)


def grid_points(sweep_file):
    """Every point of a grid sweep's parameters, in a fixed order: [{key: value}]. A file that is not such a sweep
    is a UserError that says what is wrong."""
    try:
        parameters = yaml.safe_load(Path(sweep_file).read_text())["parameters"]
        keys = list(parameters)
        values = [parameters[key]["values"] if "values" in parameters[key] else [parameters[key]["value"]]
                  for key in keys]  # fmt: skip
    except (OSError, yaml.YAMLError) as error:
        raise common.UserError(f"cannot read the sweep file {sweep_file} ({str(error).splitlines()[0]})") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise common.UserError(f"{sweep_file} is not a grid sweep (found no {error}): it needs `parameters:`, each "
                               "with `values: [...]` or `value: ...`, as sweep.yaml has") from None  # fmt: skip
    if any(not isinstance(value, list) or not value for value in values):
        raise common.UserError(f"{sweep_file}: every parameter needs a non-empty list of `values:`, or a `value:`")
    return [dict(zip(keys, point)) for point in itertools.product(*values)]


def grid_arguments(sweep_file, index):
    """The train.py arguments of one grid point, offline, in a folder of its own (named from the point), so that a
    requeued job array task resumes its own point."""
    points = grid_points(sweep_file)
    if not 0 <= index < len(points):
        raise common.UserError(f"--index {index}: {sweep_file} has {len(points)} points, 0 to {len(points) - 1}")
    settings = [f"--{key}={value}" for key, value in points[index].items()]
    name, group = trial_name(settings), f"grid-{Path(sweep_file).stem}"
    out_dir = common.output_root("runs", default=Path("runs")) / STAGE.name / group / name
    return [*settings, "--out_dir", str(out_dir), "--wandb_name", name, "--wandb_group", group, "--wandb_mode",
            "offline"]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("task", help="what each srun task of a sweep job runs").add_argument("sweep_id")
    grid = commands.add_parser("grid", help="the points of a grid sweep file, or the arguments of one")
    grid.add_argument("sweep_file")
    grid.add_argument("--index", type=int, help="a point's number (a job array's SLURM_ARRAY_TASK_ID)")
    args = parser.parse_args()
    if args.command == "task":
        return run_task(args.sweep_id)
    if args.index is None:  # a table, for people
        for index, point in enumerate(grid_points(args.sweep_file)):
            print(index, " ".join(f"--{key}={value}" for key, value in point.items()))
    else:  # one argument per line, for a script: mapfile -t arguments < <(python sweeps.py grid ... --index N)
        print("\n".join(grid_arguments(args.sweep_file, args.index)))


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
