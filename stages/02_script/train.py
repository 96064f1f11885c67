"""Stage 02: the notebook as a script you can submit to Slurm.

Train a U-Net to map a random density field to its gravitational potential.
    python stages/02_script/train.py --config quick                                     # under a minute on a CPU
    python stages/02_script/train.py --config quick --lr 1e-3 --out_dir runs/quick-lr1e-3  # override any key
"""

import collections
import dataclasses
import logging
import math
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)


def make_loaders(cfg):
    data_dir = common.ensure_data(cfg.data_preset, cfg.data_root)
    train_set = common.FieldDataset(data_dir, "train", augment=True, seed=cfg.seed)
    val_set = common.FieldDataset(data_dir, "val")
    shuffle_generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=shuffle_generator
    )
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size)
    if len(train_loader) == 0:
        raise common.UserError(f"--batch_size {cfg.batch_size} exceeds the {len(train_set)} training samples")
    common.check_depth(cfg.depth, train_set.meta["grid"])
    return train_set, train_loader, val_loader


@dataclasses.dataclass
class TrainingState:
    """The model, what trains it, and where the run stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    batch_in_epoch: int = 0  # the batches of this epoch trained so far
    step: int = 0
    epoch_loss: float = 0.0  # the sum of this epoch's batch losses so far


# What stays the same while the run trains, read-only (a namedtuple): start_run makes it, the steps read it.
RunSetup = collections.namedtuple(
    "RunSetup", "cfg out_dir device train_set train_loader val_loader batches_per_epoch writer"
)


def build_training_state(cfg, device, batches_per_epoch):
    """The model, and the optimizer and learning-rate schedule that train it."""
    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.num_epochs * batches_per_epoch)
    log.info(f"{common.count_parameters(model):,} parameters on {common.hardware(device)}")
    return TrainingState(model, optimizer, scheduler)


def train_step(state, delta, phi):
    """One optimizer step on one batch; returns the batch's loss."""
    loss = torch.nn.functional.mse_loss(state.model(delta), phi)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    state.batch_in_epoch += 1
    state.epoch_loss += loss.item()
    return loss.item()


def raise_if_diverged(loss, state):
    if not math.isfinite(loss):
        raise common.UserError(f"the loss is {loss} at step {state.step}: training diverged; try a smaller --lr")


def validate(model, loader, device):
    """Mean loss and relative L2 error over the validation set, and the last batch for a picture."""
    model.eval()
    loss_sum, error_sum, count = 0.0, 0.0, 0
    for delta, phi in loader:
        delta, phi = delta.to(device), phi.to(device)
        prediction = model(delta)
        loss_sum += torch.nn.functional.mse_loss(prediction, phi, reduction="sum").item() / phi[0].numel()
        error_sum += common.relative_l2(prediction, phi).item() * len(phi)
        count += len(phi)
    model.train()
    return loss_sum / count, error_sum / count, (delta, phi, prediction)


def log_progress(setup, state, loss, timer):
    samples_per_s, wait, eta = timer.window(state.step)  # wait: the share of the time spent waiting for data
    lr, total_steps = state.scheduler.get_last_lr()[0], setup.cfg.num_epochs * setup.batches_per_epoch
    log.info(f"step {state.step}/{total_steps} | epoch {state.epoch + 1} | loss {loss:.4f} | lr {lr:.2e} | "
             f"{samples_per_s:.0f} samples/s | data wait {wait:.0%} | ETA {eta}")  # fmt: skip
    scalars = {"train/loss": loss, "train/lr": lr, "perf/samples_per_s": samples_per_s, "perf/data_wait_share": wait}
    for name, value in scalars.items():
        setup.writer.add_scalar(name, value, state.step)


def log_validation(setup, state, train_loss, val_loss, val_error, examples):
    baseline = setup.train_set.meta["baseline_rel_l2"]
    log.info(f"epoch {state.epoch + 1}/{setup.cfg.num_epochs} | train loss {train_loss:.4f} | val loss "
             f"{val_loss:.4f} | val relative L2 error {val_error:.3f} (baseline {baseline:.3f})")  # fmt: skip
    for name, value in {"val/loss": val_loss, "val/relative_l2": val_error}.items():
        setup.writer.add_scalar(name, value, state.step)
    setup.writer.add_image("val/delta_truth_prediction_error", common.prediction_panel(*examples), state.step)


def start_run(cfg, out_dir, device):
    """The data, the model, and the run's outputs."""
    torch.manual_seed(cfg.seed)
    loaders = make_loaders(cfg)
    batches_per_epoch = len(loaders[1])
    state = build_training_state(cfg, device, batches_per_epoch)
    writer = SummaryWriter(out_dir / "tensorboard")
    log.info(f"physics baseline (linear solve): relative L2 error {loaders[0].meta['baseline_rel_l2']:.3f}")
    setup = RunSetup(cfg, out_dir, device, *loaders, batches_per_epoch, writer)
    timer = common.StepTimer(cfg.batch_size, cfg.num_epochs * batches_per_epoch, log)
    return setup, state, timer


def train(setup, state, timer):
    """The loop over epochs and steps."""
    cfg = setup.cfg
    for epoch in range(cfg.num_epochs):
        state.epoch = epoch
        setup.train_set.set_epoch(epoch)
        for delta, phi in timer.timed(setup.train_loader):
            loss = train_step(state, delta.to(setup.device), phi.to(setup.device))
            timer.step_done()
            raise_if_diverged(loss, state)
            if timer.steps and (state.step % cfg.log_every == 0 or state.batch_in_epoch == setup.batches_per_epoch):
                log_progress(setup, state, loss, timer)

        train_loss = state.epoch_loss / setup.batches_per_epoch
        val_loss, val_error, examples = validate(state.model, setup.val_loader, setup.device)
        log_validation(setup, state, train_loss, val_loss, val_error, examples)
        state.epoch, state.batch_in_epoch, state.epoch_loss = epoch + 1, 0, 0.0

    figures = {"final_train_loss": train_loss, "final_val_loss": val_loss, "val_relative_l2": val_error}
    figures |= {"baseline_relative_l2": setup.train_set.meta["baseline_rel_l2"], "steps": state.step}
    common.write_summary(setup.out_dir, STAGE, cfg, setup.device, **figures, **timer.summary())


def main(argv=None):
    cfg = common.load_config(Path(__file__).with_name("config.yaml"), argv)
    device = common.choose_device(cfg.device)
    out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir)
    common.setup_logging(out_dir, STAGE)
    log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
    setup, state, timer = start_run(cfg, out_dir, device)
    train(setup, state, timer)
    setup.writer.close()
    common.log_done(log, common.read_summary(out_dir), out_dir)


if __name__ == "__main__":
    common.run_main(main)
