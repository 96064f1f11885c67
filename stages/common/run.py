"""What every stage does the same way: configs, paths, device, logging, the run summary, images."""

import argparse
import json
import logging
import os
import platform
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


class UserError(Exception):
    """Bad input: the stage prints this one line (it says what to do) and exits, with no traceback."""


def load_config(config_file, argv=None):
    """Settings from a named config in config_file plus --key value overrides from the command line.

    `default` holds every key; another named config changes some of them. Unknown names, unknown
    keys and values of the wrong type are UserErrors that say what is valid."""
    configs = yaml.safe_load(Path(config_file).read_text())
    defaults = configs["default"]
    parser = argparse.ArgumentParser(description=f"Named configs in {config_file}: {', '.join(configs)}.")
    parser.add_argument("--config", default="default", help="a named config: " + ", ".join(configs))
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=str, help=f"(default: {value})")
    args, unknown = parser.parse_known_args(argv)
    valid_keys = "--config, " + ", ".join(f"--{key}" for key in defaults)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; valid options are {valid_keys}")
    if args.config not in configs:
        raise UserError(f"unknown config {args.config!r} in {config_file}: choose one of {', '.join(configs)}")
    settings = dict(defaults)
    for key, value in configs[args.config].items():
        if key not in defaults:
            raise UserError(f"config {args.config!r} in {config_file} sets unknown key {key!r}; valid: {valid_keys}")
        settings[key] = value
    for key, text in vars(args).items():
        if key != "config" and text is not None:
            settings[key] = parse_value(key, text, defaults[key])
    return SimpleNamespace(config=args.config, **settings)


def parse_value(key, text, default):
    """Read a command-line string as the type of the key's default value."""
    if text.lower() in ("none", "null"):
        return None
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


def output_root(kind, default):
    """$SCRATCH/<repo name>/<kind> on a cluster that has $SCRATCH, else `default` inside the repo."""
    if os.environ.get("SCRATCH"):
        return Path(os.environ["SCRATCH"]) / REPO.name / kind
    return REPO / default


def run_dir(stage, config, out_dir=None):
    """The run's output folder, created and checked for writing."""
    folder = Path(out_dir) if out_dir else output_root("runs", default=Path("runs")) / stage / config
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {folder} ({error.strerror}): choose another with --out_dir DIR") from None
    return folder


def choose_device(name="auto"):
    """CUDA if present, else the CPU; `name` may force one ('cpu', 'cuda', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no GPU is visible to PyTorch: use --device auto or cpu")
    return torch.device(name)


def hardware(device):
    """A short description of where this ran, for logs and summaries."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
