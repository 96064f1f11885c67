"""Stage 04: data loading. Worker processes prepare the next batches while the accelerator trains on this one.

python stages/04_data_loading/train.py --config quick                  # workers: one per CPU, at most 8
python stages/04_data_loading/train.py --config quick --num_workers 0  # everything in this process
"""

import dataclasses
import logging
import math
import os
import signal
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import checkpoints
import common
import data_loading

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)
# Settings a resumed run may change. All the others define the run: a checkpoint resumes only with the same.
# (The loader's settings change how fast batches come, never what is in them: see tests/test_data_loading.py.)
MAY_CHANGE_ON_RESUME = {"config", "data_root", "out_dir", "device", "log_every", "checkpoint_every", "keep_last",
                        "resume", "signal_at_step", "num_workers", "pin_memory", "persistent_workers",
                        "prefetch_factor"}  # fmt: skip
stop_signal = None  # set by the signal handler; the loop checkpoints and stops at the next step boundary


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name
    if signum == signal.SIGINT:  # a second Ctrl-C quits at once, without saving
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_settings(cfg):
    """The settings that define this run; they are stored in every checkpoint."""
    return {key: value for key, value in vars(cfg).items() if key not in MAY_CHANGE_ON_RESUME}


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
    best_val_loss: float = math.inf
    processes: int = 0  # the processes that trained this run: one more at each resume


def build_training_state(cfg, device, total_steps):
    """The model, and the optimizer and learning-rate schedule that train it."""
    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
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


def raise_if_diverged(loss, step, lr, data_dir):
    if not math.isfinite(loss):
        common.check_data_finite(data_dir)  # a NaN in the data is no matter of the learning rate
        raise common.UserError(f"the loss is {loss} at step {step}: training diverged; try a smaller --lr (now {lr})")


def save_checkpoint(state, timer, cfg, checkpoint_dir, data, resumed_from):
    """Every state a bit-exact resume needs, and the settings and the data that define the run."""
    saved = {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": checkpoints.rng_states(),
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "step": state.step,
        "epoch_loss": state.epoch_loss,
        "best_val_loss": state.best_val_loss,
        "processes": state.processes,
        "totals": timer.totals_now(),
        "settings": run_settings(cfg),
        "data": data,
        "threads": torch.get_num_threads(),
    }
    return checkpoints.save_checkpoint(checkpoint_dir, saved, cfg.keep_last, keep=resumed_from)


def resume(state, cfg, out_dir, data, device):
    """Continue from the newest good checkpoint of this run (or the one --resume names), if there is one: load every
    state it holds, the random generators' too. Returns the checkpoint (None for a new run) and its path."""
    saved, path = checkpoints.load_checkpoint(cfg.resume, out_dir / "checkpoints", run_settings(cfg), data)
    if saved is None:
        return None, None
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    checkpoints.set_rng_states(saved["rng"])
    state.epoch, state.batch_in_epoch, state.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
    state.epoch_loss, state.best_val_loss = saved["epoch_loss"], saved["best_val_loss"]
    state.processes = saved["processes"]
    if device.type == "cpu" and saved["threads"] != torch.get_num_threads():  # see the README: bit-exact resume
        log.warning(f"{torch.get_num_threads()} CPU threads now, {saved['threads']} before: results may differ")
    return saved, path


@torch.no_grad()
def validate(model, loader, device):
    """Mean loss and relative L2 error over the validation set, and the last batch for a picture."""
    model.eval()
    loss_sum, error_sum, count = 0.0, 0.0, 0
    for delta, phi in loader:
        delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)
        prediction = model(delta)
        loss_sum += torch.nn.functional.mse_loss(prediction, phi, reduction="sum").item() / phi[0].numel()
        error_sum += common.relative_l2(prediction, phi).item() * len(phi)
        count += len(phi)
    model.train()
    return loss_sum / count, error_sum / count, (delta, phi, prediction)


def log_progress(writer, state, total_steps, loss, timer):
    samples_per_s, wait, eta = timer.window(state.step)  # wait: the share of the time spent waiting for data
    lr = state.scheduler.get_last_lr()[0]
    log.info(
        f"step {state.step}/{total_steps} | epoch {state.epoch + 1} | loss {loss:.4f} | lr {lr:.2e} | "
        f"{samples_per_s:.0f} samples/s | data wait {wait:.0%} | ETA {eta}"
    )
    scalars = {"train/loss": loss, "train/lr": lr, "perf/samples_per_s": samples_per_s, "perf/data_wait_share": wait}
    for name, value in scalars.items():
        writer.add_scalar(name, value, state.step)


def log_validation(writer, state, cfg, train_loss, val_loss, val_error, baseline, examples):
    log.info(
        f"epoch {state.epoch + 1}/{cfg.num_epochs} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
        f"val relative L2 error {val_error:.3f} (baseline {baseline:.3f})"
    )
    for name, value in {"val/loss": val_loss, "val/relative_l2": val_error}.items():
        writer.add_scalar(name, value, state.step)
    writer.add_image("val/delta_truth_prediction_error", common.prediction_panel(*examples), state.step)


def save_best(state, cfg, val_loss, checkpoint_dir):
    """best.pt: the weights of the lowest validation loss so far, kept apart from the checkpoints (predict.py)."""
    if val_loss >= state.best_val_loss:
        return
    state.best_val_loss = val_loss
    best = {"model": state.model.state_dict(), "settings": run_settings(cfg), "step": state.step, "val_loss": val_loss}
    checkpoints.save_atomically(best, checkpoint_dir / "best.pt")


def train(cfg, out_dir, device):
    torch.manual_seed(cfg.seed)
    train_set, sampler, train_loader, val_loader = data_loading.make_loaders(cfg, device)
    baseline = train_set.meta["baseline_rel_l2"]
    batches_per_epoch = len(train_set) // cfg.batch_size
    total_steps = cfg.num_epochs * batches_per_epoch
    state = build_training_state(cfg, device, total_steps)
    data = common.data_identity(train_set.meta)
    saved, resumed_from = resume(state, cfg, out_dir, data, device)
    state.processes += 1
    checkpoint_dir = checkpoints.make_folder(out_dir)
    checkpoints.set_aside_newer_work(out_dir, resumed_from, state.step)
    writer = SummaryWriter(out_dir / "tensorboard", purge_step=state.step + 1)  # drop events after the checkpoint
    signal.signal(signal.SIGUSR1, request_stop)  # Slurm, --signal=B:USR1@<seconds> via submit_pm.sh
    signal.signal(signal.SIGTERM, request_stop)  # preemption, scancel
    signal.signal(signal.SIGINT, request_stop)  # Ctrl-C
    log.info(f"{common.count_parameters(state.model):,} parameters on {common.hardware(device)}; {total_steps} steps")
    log.info(f"physics baseline (linear solve): relative L2 error {baseline:.3f} on the validation set")
    if state.epoch == cfg.num_epochs:
        log.info(f"this run finished already (step {state.step}): pass --resume none to train again from scratch")
        return common.read_summary(out_dir)

    timer = common.StepTimer(cfg.batch_size, total_steps, log, totals=saved["totals"] if saved else None)
    for epoch in range(state.epoch, cfg.num_epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch, state.batch_in_epoch)
        for delta, phi in timer.timed(train_loader):
            delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)  # overlaps with compute
            loss = train_step(state, delta, phi)
            timer.step_done()
            raise_if_diverged(loss, state.step, cfg.lr, train_set.path.parent)
            if timer.steps and (state.step % cfg.log_every == 0 or state.batch_in_epoch == batches_per_epoch):
                log_progress(writer, state, total_steps, loss, timer)
            if state.step == cfg.signal_at_step:  # to try it out: the signal Slurm sends before the time limit
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop_signal or state.step % cfg.checkpoint_every == 0:
                path = save_checkpoint(state, timer, cfg, checkpoint_dir, data, resumed_from)
            if stop_signal:
                advice = checkpoints.how_to_resume(cfg.resume)
                log.info(f"{stop_signal} received: saved {path} at step {state.step}; {advice}")
                writer.close()
                return None

        train_loss = state.epoch_loss / batches_per_epoch
        val_loss, val_error, examples = validate(state.model, val_loader, device)
        log_validation(writer, state, cfg, train_loss, val_loss, val_error, baseline, examples)
        save_best(state, cfg, val_loss, checkpoint_dir)
        state.epoch, state.batch_in_epoch, state.epoch_loss = epoch + 1, 0, 0.0
        if state.epoch < cfg.num_epochs:  # the last one is saved after the summary: a finished run has both
            save_checkpoint(state, timer, cfg, checkpoint_dir, data, resumed_from)

    writer.close()
    figures = {"final_train_loss": train_loss, "final_val_loss": val_loss, "val_relative_l2": val_error}
    figures |= {"baseline_relative_l2": baseline, "steps": state.step, "processes": state.processes}
    summary = common.write_summary(out_dir, STAGE, cfg, device, **figures, **timer.summary())
    save_checkpoint(state, timer, cfg, checkpoint_dir, data, resumed_from)
    return summary


def main(argv=None):
    cfg = common.load_config(Path(__file__).with_name("config.yaml"), argv)
    out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir)
    earlier = checkpoints.set_aside_earlier_run(out_dir) if cfg.resume == "none" else None
    common.setup_logging(out_dir, STAGE)
    log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
    if earlier:
        log.info(f"--resume none: moved the earlier run's files to {earlier} (delete it when you no longer need it)")
    if cfg.deterministic:
        checkpoints.make_deterministic()
    device = common.choose_device(cfg.device)
    summary = train(cfg, out_dir, device)
    if summary is None:
        sys.exit(3)  # not 0: the run stopped early, with a checkpoint to resume from
    common.log_done(log, summary, out_dir)


if __name__ == "__main__":
    common.run_main(main, known_failures=[data_loading.known_failure], cleanup=[data_loading.end_workers])
