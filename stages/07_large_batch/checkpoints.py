"""Checkpoint files for train.py: write them atomically, find the newest good one, refuse one of another run.

train.py decides what a checkpoint holds and when to save it; this file writes, finds and checks the files.
Later stages copy it unchanged.
"""

import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common

log = logging.getLogger(__name__)
# Settings a resumed run may change, of every stage. All the others define the run: a checkpoint resumes only
# with the same. (The loader's settings change how fast batches come, never what is in them: see
# tests/test_data_loading.py. compile changes how the same arithmetic runs; precision and tf32 change the
# arithmetic, so they define the run. micro_batch_size changes how many samples are computed at once, not the
# step. The W&B settings say where the run is logged, not what it trains; profile_steps, which steps are timed.)
MAY_CHANGE_ON_RESUME = {"config", "data_root", "out_dir", "device", "log_every", "checkpoint_every", "keep_last",
                        "resume", "signal_at_step", "num_workers", "pin_memory", "persistent_workers",
                        "prefetch_factor", "compile", "ddp_timeout_s", "micro_batch_size", "trial_file",
                        "wandb_mode", "wandb_project", "wandb_entity", "wandb_group", "wandb_name", "wandb_run_id",
                        "wandb_image_every", "profile_steps"}  # fmt: skip
stop_signal = None  # the signal that asked this process to stop, set by request_stop


def run_settings(cfg):
    """The settings that define this run; they are stored in every checkpoint."""
    return {key: value for key, value in vars(cfg).items() if key not in MAY_CHANGE_ON_RESUME}


def catch_stop_signals():
    """From now on, a request to stop lets the loop save a checkpoint and stop at the next step it checks: Slurm's
    signal before the time limit (--signal=B:USR1@<seconds>, see submit_pm.sh), preemption or scancel (SIGTERM),
    Ctrl-C (SIGINT)."""
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C quits at once, without saving
        signal.signal(signal.SIGINT, signal.default_int_handler)


def rng_states():
    """Every random generator's state, as types that torch.load(weights_only=True) accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states):
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomically(state, path):
    """torch.save to a temporary file, then rename: a crash or a full disk never leaves half a file at `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old file set or the new one, never half a file
    except (OSError, RuntimeError) as error:  # a full disk or quota (torch reports some as RuntimeError)
        tmp.unlink(missing_ok=True)
        if isinstance(error, RuntimeError) and not any(sign in str(error) for sign in ("inline_container", "write")):
            raise  # not the file's (torch's writer names itself): a DataLoader worker that died meanwhile, say
        reason = str(error).strip().splitlines()[-1]
        raise common.UserError(f"cannot write {path} ({reason}): free some space or choose another --out_dir; "
                               "the checkpoints saved before are intact") from None  # fmt: skip


def save_checkpoint(folder, state, keep_last, keep=None):
    """Save as step-<step>.pt, then delete the older ones beyond the newest keep_last; never the file just
    written, nor `keep` (the one this run resumed from: the command that resumed from it may be run again)."""
    path = folder / f"step-{state['step']:08d}.pt"
    save_atomically(state, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
        if old != path and old != keep:
            old.unlink()
    return path


def load_checkpoint(resume, folder, settings, data):
    """(state, path) of the checkpoint to resume from, or (None, None) to start from scratch. resume 'auto': the
    newest checkpoint in folder that loads; a path: that one; 'none': none. A checkpoint whose run had other
    settings or other data is refused, naming the differences; so is a folder whose checkpoints all fail to load."""
    if resume == "none":
        return None, None
    candidates = [Path(resume)] if resume != "auto" else sorted(folder.glob("step-*.pt"), reverse=True)
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or corrupt: say so, and try the one before
            log.warning(f"checkpoint {path} cannot be read ({type(error).__name__}): trying the previous one")
            continue
        if not isinstance(state, dict) or "optimizer" not in state:
            raise common.UserError(f"{path} holds no training state (best.pt holds only weights, for predict.py): "
                                   "resume from a step-*.pt checkpoint")  # fmt: skip
        check_same_run(path, state, settings, data)
        log.info(f"resuming from {path}: epoch {state['epoch'] + 1}, step {state['step']}")
        return state, path
    if resume != "auto":
        raise common.UserError(f"cannot resume from {resume}: it is missing or corrupt; name another checkpoint, "
                               "or pass --resume auto")  # fmt: skip
    if candidates:
        names = ", ".join(path.name for path in candidates)
        raise common.UserError(f"no checkpoint in {folder} can be read ({names}): pass --resume none to start over "
                               "(they are then moved to earlier/), or --resume <a checkpoint> to resume from "
                               "another one")  # fmt: skip
    return None, None


def check_same_run(path, state, settings, data):
    """Refuse a checkpoint of another run: other settings, or other data (preset, seed, sizes, fingerprint)."""
    differences = [f"{key} {state['settings'].get(key)!r} there, {value!r} now"
                   for key, value in settings.items() if state["settings"].get(key) != value]  # fmt: skip
    differences += [f"data {key} {state.get('data', {}).get(key)!r} there, {value!r} now"
                    for key, value in data.items() if state.get("data", {}).get(key) != value]  # fmt: skip
    if differences:
        raise common.UserError(f"{path} is from a run with other settings or data ({'; '.join(differences)}): for "
                               "a new experiment pass its own --out_dir DIR, or pass --resume none to start over "
                               "in this folder (the earlier run's files are then moved to earlier/)")  # fmt: skip


def make_deterministic():
    """Only deterministic GPU kernels, some of them slower: then a resumed run is bit-exact on a GPU too."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, so before any GPU work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def make_folder(out_dir):
    """out_dir/checkpoints, ready to be written."""
    folder = out_dir / "checkpoints"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise common.UserError(
            f"cannot write checkpoints to {folder} ({error.strerror}): choose another --out_dir"
        ) from None
    return folder


def how_to_resume(resume):
    """The advice printed when a run stops early."""
    if resume == "auto":
        return "run the same command to resume"
    return f"to resume, run it again with --resume auto (not --resume {resume})"


def set_aside_newer_work(out_dir, resumed_from, step):
    """A resume from a checkpoint older than the folder's newest starts a new branch of the run: the checkpoints
    of the abandoned branch (those after `step`, or all of them when resumed from another folder), its best.pt and
    its summary move to out_dir/earlier/<time>-branch/, and a copy of its TensorBoard events goes there too (this
    run's events after `step` are then dropped). Nothing resumes from them and nothing is lost. Returns that
    folder, or None when there was nothing newer."""
    folder = out_dir / "checkpoints"
    own = resumed_from is not None and resumed_from.resolve().parent == folder.resolve()
    newer = [path for path in folder.glob("step-*.pt") if not own or int(path.stem.split("-")[1]) > step]
    best, summary = folder / "best.pt", out_dir / "summary.json"
    if best.exists() and (not own or torch.load(best, map_location="cpu", weights_only=True)["step"] > step):
        newer.append(best)
    if summary.exists() and (not own or json.loads(summary.read_text())["steps"] > step):
        newer.append(summary)
    if resumed_from is None or not newer:
        return None
    (out_dir / "earlier").mkdir(exist_ok=True)
    branch = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-branch-"), dir=out_dir / "earlier"))
    (branch / "checkpoints").mkdir()
    for path in newer:
        path.rename(branch / path.relative_to(out_dir))
    if (out_dir / "tensorboard").exists():
        shutil.copytree(out_dir / "tensorboard", branch / "tensorboard")
    log.info(f"resumed from an older checkpoint: a new branch; the newer work moved to {branch} (nothing lost)")
    return branch


def set_aside_earlier_run(out_dir):
    """For --resume none: move an earlier run's files to out_dir/earlier/<time>-<id>/, where nothing resumes
    from them and nothing is lost. Returns that folder, or None if there was nothing to move."""
    names = ["checkpoints", "tensorboard", "summary.json", "train.log", "profile", "stacks"]  # stages 09, 10
    names = [name for name in names if (out_dir / name).exists()]
    if not names:
        return None
    (out_dir / "earlier").mkdir(exist_ok=True)
    archive = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=out_dir / "earlier"))
    for name in names:
        (out_dir / name).rename(archive / name)
    return archive
