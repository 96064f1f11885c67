"""The one shared module of the tutorial: what never changes from stage to stage.

It holds the running example (data generator, Dataset, U-Net, physics baseline) and plumbing (config loading,
paths, device, logging, the timing of steps, run summary, reading TensorBoard curves back, images). It never holds a
stage's concept:
no checkpointing, DataLoader settings, mixed precision, DDP, LR rules or W&B live here.
"""

from .data import (
    FieldDataset,
    check_data,
    check_data_finite,
    data_dir_for,
    data_identity,
    ensure_data,
    find_non_finite,
    random_symmetry,
)
from .fields import PRESETS, generate, linear_baseline, relative_l2
from .run import (
    LIMITS,
    REPO,
    UserError,
    choose_device,
    colorize,
    cpu_threads,
    hardware,
    load_config,
    log_done,
    output_root,
    prediction_panel,
    read_summary,
    run_date,
    run_dir,
    run_main,
    scalar_curve,
    setup_logging,
    to_pil,
    write_summary,
)
from .timing import StepTimer
from .unet import UNet, check_depth, count_parameters

__all__ = [
    "FieldDataset",
    "LIMITS",
    "PRESETS",
    "StepTimer",
    "REPO",
    "UNet",
    "UserError",
    "check_data",
    "check_data_finite",
    "check_depth",
    "choose_device",
    "colorize",
    "cpu_threads",
    "count_parameters",
    "data_dir_for",
    "data_identity",
    "ensure_data",
    "find_non_finite",
    "generate",
    "hardware",
    "linear_baseline",
    "load_config",
    "log_done",
    "output_root",
    "prediction_panel",
    "random_symmetry",
    "read_summary",
    "run_date",
    "relative_l2",
    "run_dir",
    "run_main",
    "scalar_curve",
    "setup_logging",
    "to_pil",
    "write_summary",
]
