"""The global batch as a knob (stage 07's concept): how many micro-batches each process computes per step, the
learning rate a larger batch gets, and the schedule that warms it up and decays it.

Later stages copy this file unchanged.
"""

import logging
import math

import torch

import common

log = logging.getLogger(__name__)


def micro_batches(cfg, world_size):
    """(micro-batch, micro-batches per step) of each process. The global batch is shared by the processes; each
    computes at most micro_batch_size samples at once (0: no limit) and adds up the gradients of several."""
    local_batch = cfg.global_batch_size // world_size
    if cfg.micro_batch_size == 0 or cfg.micro_batch_size >= local_batch:
        return local_batch, 1
    if local_batch % cfg.micro_batch_size:
        raise common.UserError(f"--micro_batch_size {cfg.micro_batch_size} must divide the {local_batch} samples "
                               f"that each of {world_size} process(es) takes of --global_batch_size "
                               f"{cfg.global_batch_size}: choose a divisor of {local_batch}")  # fmt: skip
    return cfg.micro_batch_size, local_batch // cfg.micro_batch_size


def peak_lr(cfg):
    """base_lr was tuned at base_batch_size; a k times larger global batch gets a larger learning rate.
    linear: k times (the rule of Goyal et al. 2017, for SGD); sqrt: sqrt(k) times (the variance of the mean
    gradient falls as 1/k; used with Adam); none: base_lr at every batch size."""
    k = cfg.global_batch_size / cfg.base_batch_size
    return cfg.base_lr * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[cfg.lr_scaling]


def warmup_steps(cfg, steps_per_epoch):
    """A batch larger than the base warms up over warmup_epochs: a large LR on the random weights of the first steps
    can diverge."""
    return round(cfg.warmup_epochs * steps_per_epoch) if cfg.global_batch_size > cfg.base_batch_size else 0


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """The learning rate ramps up linearly from base_lr to the peak over the warmup steps, if any; then a cosine
    decays it to zero at the end."""
    warmup, total_steps = warmup_steps(cfg, steps_per_epoch), cfg.num_epochs * steps_per_epoch
    log.info(f"peak lr {peak_lr(cfg):.2e} ({cfg.lr_scaling} rule, base_lr {cfg.base_lr:.2e} at batch "
             f"{cfg.base_batch_size}), {warmup} warmup steps, then cosine to 0")  # fmt: skip
    if warmup >= total_steps:
        raise common.UserError(f"--warmup_epochs {cfg.warmup_epochs} ({warmup} steps) leaves no step of the "
                               f"{total_steps} of this run after the warmup: choose fewer warmup epochs")  # fmt: skip
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - warmup)
    if warmup == 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.base_lr / peak_lr(cfg), total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
