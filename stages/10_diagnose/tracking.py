"""Weights & Biases for train.py (stage 08's concept), on rank 0 only: choose the mode before anything waits on a
network, start or continue the run, log metrics against an explicit step, and finish. W&B's run object is
returned by start and passed to the others: this module keeps no state of its own.

Modes (--wandb_mode, or W&B's own WANDB_MODE): auto is online when there are credentials and the server answers
in time, else offline (the run is written to disk, for `wandb sync` later); online, offline and disabled are
what they say. Nothing here prompts: with no credentials it says so and goes offline.

Later stages copy this file unchanged.
"""

import logging
import netrc
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import urlparse

import common

log = logging.getLogger(__name__)
SERVER_TIMEOUT_S = 5  # how long the server may take to accept a connection before the run goes offline
INIT_TIMEOUT_S = 90  # wandb's own default wait for the server's answer to wandb.init (WANDB_INIT_TIMEOUT changes it)
# W&B's own environment variables set these settings too (the command line wins over them, they over config.yaml)
ENVIRONMENT = {
    "wandb_mode": "WANDB_MODE",
    "wandb_project": "WANDB_PROJECT",
    "wandb_entity": "WANDB_ENTITY",
    "wandb_group": "WANDB_RUN_GROUP",
    "wandb_name": "WANDB_NAME",
    "wandb_run_id": "WANDB_RUN_ID",
}


def server_url():
    """The W&B server this wandb talks to: WANDB_BASE_URL, or wandb's own default (which changes between
    versions, so it is read from wandb, never typed here)."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def check_names(cfg, run_id=None):
    """Refuse a project name or run id that W&B would refuse, before anything starts (W&B's own check)."""
    if cfg.wandb_mode == "disabled":
        return
    try:
        import wandb
    except ImportError as error:
        raise common.UserError(f"W&B's package cannot be imported here ({error}): pip install wandb, or pass "
                               "--wandb_mode disabled") from None  # fmt: skip
    try:
        wandb.Settings(project=cfg.wandb_project, run_id=run_id or cfg.wandb_run_id)
    except wandb.errors.UsageError as error:
        raise common.UserError(f"W&B refuses these settings ({str(error).splitlines()[0]}): choose another "
                               "--wandb_project or --wandb_run_id") from None  # fmt: skip


def why_not_online(url, timeout_s):
    """None if a run can go online: credentials for the server, which accepts a connection; else the reason."""
    host = urlparse(url).hostname
    has_key = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
    try:
        has_key = has_key or netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        pass  # no ~/.netrc: no login
    if not has_key:
        return "no W&B credentials here (run `wandb login` once, or set WANDB_API_KEY)"
    port = urlparse(url).port or (443 if urlparse(url).scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"the W&B server {host} does not answer from this node ({error.strerror or error})"
    return None


def start(cfg, out_dir, checkpoint_run_id, default_name):
    """Start this process's W&B run (rank 0's), and return it; None when W&B is disabled. It continues the run of
    the checkpoint (checkpoint_run_id), else the one --wandb_run_id names (a sweep trial's), else it is a new one.
    (A new branch of a resumed run gets a new W&B run: W&B would drop the steps it logs again below the old run's
    last, see the README.) Meanwhile the other ranks wait in a collective: W&B gets half of --ddp_timeout_s to
    start online. Its files go to out_dir/wandb, beside the checkpoints, never into the repository or home."""
    if cfg.wandb_mode == "disabled":
        from_environment = os.environ.get("WANDB_MODE") == "disabled"
        log.info(f"W&B disabled{' (WANDB_MODE=disabled in the environment)' if from_environment else ''}")
        return None
    run_id, name = checkpoint_run_id or cfg.wandb_run_id, cfg.wandb_name or default_name
    time_limit_s = cfg.ddp_timeout_s / 2
    os.environ.setdefault("WANDB_DIR", str(out_dir))
    os.environ.setdefault("WANDB_CACHE_DIR", str(common.output_root("wandb", default=Path("runs/wandb")) / "cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(common.output_root("wandb", default=Path("runs/wandb")) / "data"))
    import wandb

    mode = "offline" if cfg.wandb_mode == "offline" else "online"
    server_timeout_s = min(SERVER_TIMEOUT_S, time_limit_s / 4)
    problem = why_not_online(server_url(), server_timeout_s) if mode == "online" else None
    if problem and cfg.wandb_mode == "online":
        raise common.UserError(f"--wandb_mode online, but {problem}: fix that, or use --wandb_mode auto or offline")
    if problem:
        log.warning(f"W&B: {problem}: logging offline to {out_dir / 'wandb'}")
        mode = "offline"
    # Online: an answer within W&B's 90 s (or WANDB_INIT_TIMEOUT), and at most half of time_limit_s, or an error.
    init_timeout_s = min(float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)), time_limit_s / 2)
    settings = wandb.Settings(init_timeout=init_timeout_s, silent=True)
    try:
        run, failure = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group,
                                  name=name, id=run_id, resume="allow", config=vars(cfg), mode=mode, dir=out_dir,
                                  settings=settings), None  # fmt: skip
    except Exception as error:  # a refused key, a server that stopped answering: say so, and go on offline
        failure = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        forget(error)
    if failure:
        wandb.teardown()
        if cfg.wandb_mode == "online":
            raise common.UserError(f"W&B could not start online ({failure}): check `wandb login` and the "
                                   "network, or use --wandb_mode offline")  # fmt: skip
        log.warning(f"W&B could not start online ({failure}): logging offline to {out_dir / 'wandb'}")
        mode = "offline"
        run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, group=cfg.wandb_group, name=name,
                         id=run_id, resume="allow", config=vars(cfg), mode=mode, dir=out_dir)  # fmt: skip
    # Every metric against our own step: a run resumed from a checkpoint older than the last logged step logs
    # those steps again, and W&B would drop points whose step is below its last one.
    run.define_metric("trainer/step")
    run.define_metric("*", step_metric="trainer/step")
    if mode == "offline":
        log.info(f"W&B offline: run {run.id} in {Path(run.dir).parent}; to upload it later, from a node with "
                 f"network: wandb sync {out_dir}/wandb/offline-run-*")  # fmt: skip
    else:
        log.info(f"W&B online: {run.url}")
    return run


def forget(error):
    """Drop an error's tracebacks (and those of the errors it arose from). wandb keeps a failed start's error in a
    reference cycle; its traceback reaches train()'s frame, so the DataLoader and its workers would outlive
    training, be ended by the garbage collector in an order that leaves them waiting (they ignore SIGTERM), and
    keep the process from exiting."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
        error = error.__context__


def log_metrics(run, step, metrics, image=None):
    """Metrics (and a CHW image in [0, 1]) at an optimizer step; nothing when there is no run."""
    if run is None:
        return
    import wandb

    values = {"trainer/step": step, **metrics}
    if image is not None:
        values["val/delta_truth_prediction_error"] = wandb.Image(image.permute(1, 2, 0).numpy())
    run.log(values)


def image_due(step, image_every, steps_per_validation):
    """An image at the run's first validation, then at the first one after every image_every steps: a function of
    the step alone, so a resumed run keeps the same rhythm."""
    return (step - 1) // image_every != (step - 1 - steps_per_validation) // image_every


def finish(run, exit_code=0):
    """End the run: 0 finished, 3 stopped early to resume later, another code failed."""
    if run is not None:
        started = time.perf_counter()
        run.finish(exit_code=exit_code)
        log.info(f"W&B run finished with exit code {exit_code} ({time.perf_counter() - started:.0f} s)")


def finish_after_failure():
    """A run that failed: W&B's current run (wandb.run, if wandb was imported at all) ends with exit code 1."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        finish(wandb.run, 1)
