"""What every stage does the same way: configs, paths, device, logging, the run summary, images."""

import argparse
import fcntl
import json
import logging
import math
import os
import platform
import re
import socket
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from .fields import PRESETS

REPO = Path(__file__).resolve().parents[2]


# The values each setting of any stage may take (a setting means the same in every stage that has it), checked when
# a config is read: a bad one stops with a one-line error. ">= 1": a number at least 1; a list: one of its choices.
LIMITS = {"data_preset": list(PRESETS), "seed": ">= 0", "base_channels": ">= 1", "depth": ">= 1",
          "lr": "> 0", "batch_size": ">= 1", "weight_decay": ">= 0", "num_epochs": ">= 1", "log_every": ">= 1",
          "checkpoint_every": ">= 1", "keep_last": ">= 1", "signal_at_step": ">= 0", "num_workers": ">= -1",
          "prefetch_factor": ">= 1", "precision": ["auto", "fp32", "bf16", "fp16"], "ddp_timeout_s": "> 0",
          "base_lr": "> 0", "base_batch_size": ">= 1", "global_batch_size": ">= 1", "micro_batch_size": ">= 0",
          "lr_scaling": ["none", "linear", "sqrt"], "warmup_epochs": ">= 0",
          "wandb_mode": ["auto", "online", "offline", "disabled"], "wandb_image_every": ">= 1"}  # fmt: skip


class UserError(Exception):
    """Bad input: the stage prints this one line (it says what to do) and exits, with no traceback."""


def run_main(main, rank=0, known_failures=(), cleanup=()):
    """Run a stage's main() and end the process the way this tutorial promises: bad input (a UserError) and Ctrl-C
    in one line, naming the rank from stage 06 on; an error that one of known_failures explains (it returns a line,
    or None) in that line; any other error with its traceback. Each of cleanup (ending the DataLoader's workers,
    say) runs before the message, and again at the very end, whatever happened."""
    where = "error" if rank == 0 else f"error on rank {rank}"
    try:
        main()
    except UserError as error:
        sys.exit(f"{where}: {error}")
    except KeyboardInterrupt:
        sys.exit(f"{where}: interrupted (Ctrl-C)")
    except Exception as error:  # a worker or another process died, or an unexpected error: end now
        for step in cleanup:
            step()  # first: a worker ending now would raise again inside this handler
        reason = next((line for line in (explain(error) for explain in known_failures) if line), None)
        if reason is None:
            traceback.print_exc()  # (left uncaught, the error would keep the DataLoader alive, and its workers with it)
        sys.exit(1 if reason is None else f"{where}: {reason}")
    finally:
        for step in cleanup:
            step()


def log_done(log, summary, out_dir):
    """The last line of a run: how long, how good against the physics baseline, how fast, and where it is all."""
    log.info(
        f"done in {summary['wall_time_s']:.0f} s: val relative L2 error {summary['val_relative_l2']:.3f} "
        f"(baseline {summary['baseline_relative_l2']:.3f}), {summary['samples_per_s']:.0f} samples/s; "
        f"summary in {out_dir / 'summary.json'}"
    )


def load_config(config_file, argv=None, limits=None, renamed=None, environment=None):
    """Settings from a named config in config_file, then from environment variables, then from --key value
    overrides on the command line (each later one wins).

    `default` holds every key; another named config changes some of them. `limits` maps a key to the
    values it may take: ">= 1", "> 0" or a list of choices (by default LIMITS, above). `renamed` maps an earlier
    stage's name of a key
    to this stage's, for the error; `environment` maps a key to the variable that may set it (W&B's own
    WANDB_MODE, say). Unknown names and keys (abbreviations too: --num_epoch is not --num_epochs), values of
    the wrong type or out of range, and YAML errors are UserErrors that say what is valid. `~` and
    `$VARIABLES` in text values are expanded."""
    limits = LIMITS if limits is None else limits
    configs = read_configs(config_file)
    defaults = configs["default"]
    parser = argparse.ArgumentParser(description=f"Named configs in {config_file}: {', '.join(configs)}.",
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--config", default="default", help="a named config: " + ", ".join(configs))
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=str, help=f"(default: {value})")
    args, unknown = parser.parse_known_args(argv)
    valid_keys = "--config, " + ", ".join(f"--{key}" for key in defaults)
    if unknown:
        raise UserError(unknown_option_message(unknown[0], renamed or {}, valid_keys))
    if args.config not in configs:
        raise UserError(f"unknown config {args.config!r} in {config_file}: choose one of {', '.join(configs)}")
    settings = dict(defaults)
    for key, value in configs[args.config].items():
        if key not in defaults:
            raise UserError(f"config {args.config!r} in {config_file} sets unknown key {key!r}; valid: {valid_keys}")
        settings[key] = value
    for key, variable in (environment or {}).items():  # the command line wins over the environment
        if os.environ.get(variable) and getattr(args, key) is None:
            try:
                settings[key] = check_value(key, parse_value(key, os.environ[variable], defaults[key]), defaults[key],
                                            (limits or {}).get(key))  # fmt: skip
            except UserError as error:
                raise UserError(f"{variable}={os.environ[variable]} in the environment sets --{key}: {error}") from None
    for key, text in vars(args).items():
        if key != "config" and text is not None:
            settings[key] = parse_value(key, text, defaults[key])
    for key, value in settings.items():
        settings[key] = check_value(key, value, defaults[key], (limits or {}).get(key))
    return SimpleNamespace(config=args.config, **settings)


def unknown_option_message(option, renamed, valid_keys):
    name = option.split("=")[0].removeprefix("--")
    if name in renamed:
        return f"--{name} is named --{renamed[name]} in this stage (see its README); valid options are {valid_keys}"
    return f"unknown option {option!r} (options are spelled out in full); valid options are {valid_keys}"


def read_configs(config_file):
    """The named configs of a YAML file, each a mapping of settings; a broken file is a UserError."""
    try:
        configs = yaml.safe_load(Path(config_file).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise UserError(f"{config_file} is not valid YAML{where} ({problem}): fix that line, "
                        f"or restore the file with: git checkout {config_file}") from None  # fmt: skip
    if not isinstance(configs, dict) or not isinstance(configs.get("default"), dict):
        raise UserError(f"{config_file} must hold named configs (`default:` first, every key under it)")
    for name, values in configs.items():
        configs[name] = values or {}  # a named config whose lines are all commented out changes nothing
        if not isinstance(configs[name], dict):
            raise UserError(f"config {name!r} in {config_file} must be a list of `key: value` lines")
    return configs


def parse_value(key, text, default):
    """Read a command-line string as the type of the key's default value."""
    if default is None:  # a path: `none` or `null` keep the default
        return None if text.lower() in ("none", "null") else text
    try:
        if isinstance(default, bool):
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except (ValueError, KeyError):
        kind = type(default).__name__
        raise UserError(f"--{key} expects a {kind} (like {default!r}), got {text!r}") from None
    return text


def check_value(key, value, default, limit):
    """The value as the type of the key's default, in range, with ~ and $VARIABLES expanded; else a UserError."""
    if isinstance(value, str) and not isinstance(default, str | None):
        value = parse_value(key, value, default)  # YAML reads 1e-3 (no dot) as text
    if value is None and default is not None:
        raise UserError(f"--{key} needs a value (like {default!r})")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    kind = str if default is None else type(default)
    if value is not None and (type(value) is not kind):
        raise UserError(f"--{key} expects a {kind.__name__} (like {default!r}), got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{key} must be a finite number, got {value}")
    if isinstance(value, str):
        value = expand_path(key, value)
    if limit is not None and value is not None:
        check_limit(key, value, limit)
    return value


def check_limit(key, value, limit):
    if isinstance(limit, list | tuple):
        if value not in limit:
            raise UserError(f"--{key} must be one of {', '.join(map(str, limit))}; got {value!r}")
        return
    operator, bound = limit.split()
    if not (value > float(bound) if operator == ">" else value >= float(bound)):
        raise UserError(f"--{key} must be {limit}; got {value!r}")


def expand_path(key, text):
    """~ and $VARIABLES, as a shell would expand them; an unset variable is a UserError, not a folder named `$X`."""
    if "~" not in text and "$" not in text:
        return text
    expanded = os.path.expandvars(os.path.expanduser(text))
    if "$" in expanded:
        raise UserError(f"--{key} {text!r} names an environment variable that is not set here: give a full path")
    return expanded


def output_root(kind, default):
    """$SCRATCH/<repo name>/<kind> on a cluster that has $SCRATCH, else `default` inside the repo."""
    if os.environ.get("SCRATCH"):
        return Path(os.environ["SCRATCH"]) / REPO.name / kind
    return REPO / default


def run_dir(stage, config, out_dir=None, create=True):
    """The run's output folder: created, checked for writing, and locked for this process (one run per folder).
    create=False: only its path, for a process that reads the folder but never writes to it."""
    folder = Path(out_dir) if out_dir else output_root("runs", default=Path("runs")) / stage / config
    if not create:
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror}): choose another with --out_dir DIR") from None
    lock_folder(folder)
    return folder


_locked = {}  # folder -> open lock file; the lock lasts as long as this process (the kernel, in a notebook)


def lock_folder(folder):
    """Take folder/.lock, or say which run holds it. The operating system frees the lock when the process
    ends, however it ends (even SIGKILL), so a crashed run never leaves the folder locked."""
    folder = Path(folder).resolve()
    if folder in _locked:
        return
    handle = open(folder / ".lock", "a+")  # kept open on purpose: closing it would free the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{folder} is in use by another run ({holder}): wait for it to finish, "
                        "or give this run its own folder with --out_dir DIR") from None  # fmt: skip
    except OSError as error:  # a file system without locks: say so, and go on
        logging.getLogger(__name__).warning(f"cannot lock {folder} ({error.strerror}): run one job per folder")
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _locked[folder] = handle


def choose_device(name="auto"):
    """CUDA if present, else the CPU; `name` may force one ('cpu', 'cuda', 'cuda:1'). On the CPU, PyTorch
    computes with cpu_threads() threads."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no GPU is visible to PyTorch: use --device auto or cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    if name == "cpu":
        torch.set_num_threads(cpu_threads())
    return torch.device(name)


def cpu_threads():
    """One thread per process, or OMP_NUM_THREADS if you set it: a fixed rule, never the machine's current load.
    (PyTorch's default, one thread per core, spins while it waits for its slowest thread: on 2 cores with one
    busy elsewhere, stage 03 with 2 threads fell from 201 to 61 samples/s, with 1 thread it kept its 133. And the
    thread count changes the order of the sums, so a bit-exact resume needs the same count: checkpoints store it.)"""
    text = os.environ.get("OMP_NUM_THREADS", "1")
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"OMP_NUM_THREADS={text!r} is not a number of threads: unset it, or set it to 1 or more")
    return int(text)


def hardware(device):
    """A short description of where this ran, for logs and summaries."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def setup_logging(out_dir, name):
    """Log lines to the terminal and to out_dir/train.log (appended)."""
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(Path(out_dir) / "train.log")]
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    return logging.getLogger(name)


def write_summary(out_dir, stage, cfg, device, **figures):
    """Write summary.json (atomically): the figures, the settings and where it ran."""
    summary = {
        "stage": stage,
        **figures,
        "hardware": hardware(device),
        "device": device.type,
        # the largest GPU memory tensors held at once, in this process (a resumed run: since it resumed)
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": vars(cfg),
    }
    tmp = Path(out_dir) / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(Path(out_dir) / "summary.json")
    return summary


def read_summary(out_dir):
    return json.loads((Path(out_dir) / "summary.json").read_text())


def scalar_curve(run_dir, tag):
    """[(step, seconds since the run's TensorBoard file was opened, value)] of one scalar, read with TensorBoard's
    own event reader from run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    start = events.FirstEventTimestamp()
    return [(event.step, event.wall_time - start, event.value) for event in events.Scalars(tag)]


def run_date(run_dir):
    """The day (UTC) a run started, from the name TensorBoard gave its first event file,
    events.out.tfevents.<unix time>.<host>...; '' for a run without one."""
    times = [int(path.name.split(".")[3]) for path in (Path(run_dir) / "tensorboard").glob("events.out.tfevents.*")]
    return time.strftime("%Y-%m-%d", time.gmtime(min(times))) if times else ""


def colorize(fields, limit=3.0):
    """(N, 1, H, W) values -> (N, 3, H, W) RGB in [0, 1]: blue below zero, white at zero, red above."""
    t = (fields / limit).clamp(-1, 1)
    red = torch.where(t < 0, 1 + t, torch.ones_like(t))
    blue = torch.where(t > 0, 1 - t, torch.ones_like(t))
    green = 1 - t.abs()
    return torch.cat([red, green, blue], dim=1)


def prediction_panel(delta, target, prediction, samples=4):
    """One image, rows of input | truth | prediction | error for a few samples (CHW, for TensorBoard)."""
    from torchvision.utils import make_grid

    columns = [delta, target, prediction, prediction - target]
    tiles = torch.stack([colorize(c.detach().float().cpu()) for c in columns], dim=1)  # N, 4, 3, H, W
    return make_grid(tiles[:samples].flatten(0, 1), nrow=4, padding=2, pad_value=0.5)


def to_pil(image, scale=3):
    """A CHW image in [0, 1] as a PIL image, enlarged with sharp pixels, for display in a notebook."""
    from torchvision.transforms.functional import to_pil_image

    picture = to_pil_image(image.clamp(0, 1))
    return picture.resize((picture.width * scale, picture.height * scale), resample=0)  # 0: nearest
