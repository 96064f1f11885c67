"""Stage 02: the notebook as a script you can submit to Slurm.

Train a U-Net to map a random density field to its gravitational potential.
    python stages/02_script/train.py --config quick            # seconds on a CPU
    python stages/02_script/train.py --config small --lr 1e-3  # any key can be overridden
"""

import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import common

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)
# The values each setting may take, checked when the config is read: a bad one stops with a one-line error.
LIMITS = {"data_preset": list(common.PRESETS), "seed": ">= 0", "base_channels": ">= 1", "depth": ">= 1", "lr": "> 0",
          "batch_size": ">= 1", "weight_decay": ">= 0", "num_epochs": ">= 1", "log_every": ">= 1"}  # fmt: skip


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


@torch.no_grad()
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


def train(cfg, out_dir):
    device = common.choose_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_set, train_loader, val_loader = make_loaders(cfg)
    baseline = train_set.meta["baseline_rel_l2"]

    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.num_epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    writer = SummaryWriter(out_dir / "tensorboard")
    log.info(f"{common.count_parameters(model):,} parameters on {common.hardware(device)}; {total_steps} steps")
    log.info(f"physics baseline (linear solve): relative L2 error {baseline:.3f} on the validation set")

    step, start = 0, time.perf_counter()
    train_time, wait_time = 0.0, 0.0
    for epoch in range(cfg.num_epochs):
        train_set.set_epoch(epoch)
        epoch_loss, window_steps, window_wait, window_start = 0.0, 0, 0.0, time.perf_counter()
        step_start = time.perf_counter()
        for batch_index, (delta, phi) in enumerate(train_loader):
            window_wait += time.perf_counter() - step_start  # time spent waiting for this batch
            delta, phi = delta.to(device), phi.to(device)
            loss = torch.nn.functional.mse_loss(model(delta), phi)
            if not torch.isfinite(loss):
                raise common.UserError(f"the loss is {loss.item()} at step {step + 1}: training diverged; "
                                       f"try a smaller --lr (this run: {cfg.lr})")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            window_steps += 1
            epoch_loss += loss.item()

            if window_steps == cfg.log_every or batch_index == len(train_loader) - 1:
                elapsed = time.perf_counter() - window_start
                samples_per_s = window_steps * cfg.batch_size / elapsed
                wait_share = window_wait / elapsed
                eta = (total_steps - step) * elapsed / window_steps
                lr = scheduler.get_last_lr()[0]
                log.info(
                    f"step {step}/{total_steps} | epoch {epoch + 1} | loss {loss.item():.4f} | lr {lr:.2e} | "
                    f"{samples_per_s:.0f} samples/s | data wait {wait_share:.0%} | ETA {format_seconds(eta)}"
                )
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("perf/samples_per_s", samples_per_s, step)
                writer.add_scalar("perf/data_wait_share", wait_share, step)
                train_time, wait_time = train_time + elapsed, wait_time + window_wait
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
            step_start = time.perf_counter()

        val_loss, val_error, examples = validate(model, val_loader, device)
        train_loss = epoch_loss / len(train_loader)
        log.info(
            f"epoch {epoch + 1}/{cfg.num_epochs} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
            f"val relative L2 error {val_error:.3f} (baseline {baseline:.3f})"
        )
        writer.add_scalar("val/loss", val_loss, step)
        writer.add_scalar("val/relative_l2", val_error, step)
        writer.add_image("val/delta_truth_prediction_error", common.prediction_panel(*examples), step)

    writer.close()
    return common.write_summary(
        out_dir,
        STAGE,
        cfg,
        device,
        final_train_loss=train_loss,
        final_val_loss=val_loss,
        val_relative_l2=val_error,
        baseline_relative_l2=baseline,
        samples_per_s=step * cfg.batch_size / train_time,
        data_wait_share=wait_time / train_time,
        wall_time_s=time.perf_counter() - start,
        steps=step,
    )


def format_seconds(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, math.ceil(seconds))))


def main(argv=None):
    cfg = common.load_config(Path(__file__).with_name("config.yaml"), argv, LIMITS)
    out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir)
    common.setup_logging(out_dir, STAGE)
    log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
    summary = train(cfg, out_dir)
    log.info(
        f"done in {summary['wall_time_s']:.0f} s: val relative L2 error {summary['val_relative_l2']:.3f} "
        f"(baseline {summary['baseline_relative_l2']:.3f}), {summary['samples_per_s']:.0f} samples/s; "
        f"summary in {out_dir / 'summary.json'}"
    )


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (Ctrl-C)")
