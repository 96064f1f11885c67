"""Stage 04: data loading. Worker processes prepare the next batches while the accelerator trains on this one.

    python stages/04_data_loading/train.py --config quick                  # workers: one per CPU, at most 8
    python stages/04_data_loading/train.py --config quick --num_workers 0  # everything in this process
"""

import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import checkpoints
import common
import data_loading

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)
# The values each setting may take, checked when the config is read: a bad one stops with a one-line error.
LIMITS = {"data_preset": list(common.PRESETS), "seed": ">= 0", "base_channels": ">= 1", "depth": ">= 1", "lr": "> 0",
          "batch_size": ">= 1", "weight_decay": ">= 0", "num_epochs": ">= 1", "log_every": ">= 1",
          "checkpoint_every": ">= 1", "keep_last": ">= 1", "signal_at_step": ">= 0",
          "num_workers": ">= -1", "prefetch_factor": ">= 1"}  # fmt: skip
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


def make_deterministic():
    """Only deterministic GPU kernels, some of them slower: then a resumed run is bit-exact on a GPU too."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, so before any GPU work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def run_settings(cfg):
    """The settings that define this run; they are stored in every checkpoint."""
    return {key: value for key, value in vars(cfg).items() if key not in MAY_CHANGE_ON_RESUME}


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


def train(cfg, out_dir):
    if cfg.deterministic:
        make_deterministic()
    device = common.choose_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_set, sampler, train_loader, val_loader = data_loading.make_loaders(cfg, device)
    batches_per_epoch = len(train_set) // cfg.batch_size
    baseline = train_set.meta["baseline_rel_l2"]

    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.num_epochs * batches_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    checkpoint_dir = out_dir / "checkpoints"
    start_epoch, first_batch, step, epoch_loss, best_val_loss = 0, 0, 0, 0.0, math.inf
    # Summed over every process of this run, so that summary.json describes the whole run.
    totals = {"train_time": 0.0, "wait_time": 0.0, "timed_steps": 0, "wall_time": 0.0, "processes": 0}
    data = common.data_identity(train_set.meta)
    state, resumed_from = checkpoints.load_checkpoint(cfg.resume, checkpoint_dir, run_settings(cfg), data)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoints.set_rng_states(state["rng"])
        start_epoch, first_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        epoch_loss, best_val_loss, totals = state["epoch_loss"], state["best_val_loss"], state["totals"]
        if device.type == "cpu" and state["threads"] != torch.get_num_threads():  # see the README: bit-exact resume
            log.warning(f"{torch.get_num_threads()} CPU threads now, {state['threads']} before: results may differ")
    totals["processes"] += 1
    try:
        checkpoint_dir.mkdir(exist_ok=True)
    except OSError as error:
        raise common.UserError(f"cannot write checkpoints to {checkpoint_dir} ({error.strerror}): "
                               "choose another --out_dir") from None  # fmt: skip
    branch = checkpoints.set_aside_newer_work(out_dir, resumed_from, step)
    if branch:
        log.info(f"resumed from an older checkpoint: a new branch; the newer work moved to {branch} (nothing lost)")
    writer = SummaryWriter(out_dir / "tensorboard", purge_step=step + 1)  # drop events logged after the checkpoint

    def checkpoint(epoch, batch_in_epoch):
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": checkpoints.rng_states(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                 "epoch_loss": epoch_loss, "best_val_loss": best_val_loss, "settings": run_settings(cfg),
                 "totals": {**totals, "wall_time": totals["wall_time"] + time.perf_counter() - start},
                 "threads": torch.get_num_threads(), "data": data}  # fmt: skip
        return checkpoints.save_checkpoint(checkpoint_dir, state, cfg.keep_last, keep=resumed_from)

    signal.signal(signal.SIGUSR1, request_stop)  # Slurm, --signal=B:USR1@<seconds> via submit_pm.sh
    signal.signal(signal.SIGTERM, request_stop)  # preemption, scancel
    signal.signal(signal.SIGINT, request_stop)  # Ctrl-C
    log.info(f"{common.count_parameters(model):,} parameters on {common.hardware(device)}; {total_steps} steps")
    log.info(f"physics baseline (linear solve): relative L2 error {baseline:.3f} on the validation set")

    if start_epoch == cfg.num_epochs:
        log.info(f"this run finished already (step {step}): pass --resume none to train again from scratch")
        return common.read_summary(out_dir)
    start = time.perf_counter()
    for epoch in range(start_epoch, cfg.num_epochs):
        sampler.set_epoch(epoch, first_batch)
        window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
        step_start = time.perf_counter()
        for batch_index, (delta, phi) in enumerate(train_loader, first_batch):
            window_wait += time.perf_counter() - step_start  # time spent waiting for this batch
            delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)  # overlaps with compute
            loss = torch.nn.functional.mse_loss(model(delta), phi)
            if not torch.isfinite(loss):
                common.check_data_finite(train_set.path.parent)
                raise common.UserError(f"the loss is {loss.item()} at step {step + 1}: training diverged; "
                                       f"try a smaller --lr (this run: {cfg.lr})")  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            window_steps += 1
            epoch_loss += loss.item()

            if window_steps == cfg.log_every or batch_index == batches_per_epoch - 1:
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
                totals["train_time"] += elapsed
                totals["wait_time"] += window_wait
                totals["timed_steps"] += window_steps
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
            if step == cfg.signal_at_step:  # to try it out: the signal Slurm sends before the time limit
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop_signal or step % cfg.checkpoint_every == 0:
                path = checkpoint(epoch, batch_index + 1)
            if stop_signal:
                advice = checkpoints.how_to_resume(cfg.resume)
                log.info(f"{stop_signal} received: saved {path} at step {step}; {advice}")
                writer.close()
                return None
            step_start = time.perf_counter()

        val_loss, val_error, examples = validate(model, val_loader, device)
        train_loss = epoch_loss / batches_per_epoch
        log.info(
            f"epoch {epoch + 1}/{cfg.num_epochs} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
            f"val relative L2 error {val_error:.3f} (baseline {baseline:.3f})"
        )
        writer.add_scalar("val/loss", val_loss, step)
        writer.add_scalar("val/relative_l2", val_error, step)
        writer.add_image("val/delta_truth_prediction_error", common.prediction_panel(*examples), step)
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            best = {"model": model.state_dict(), "settings": run_settings(cfg), "step": step, "val_loss": val_loss}
            checkpoints.save_atomically(best, checkpoint_dir / "best.pt")
        first_batch, epoch_loss = 0, 0.0
        if epoch + 1 < cfg.num_epochs:  # the last one is saved after the summary: a finished run has both
            checkpoint(epoch + 1, 0)

    writer.close()
    summary = common.write_summary(
        out_dir,
        STAGE,
        cfg,
        device,
        final_train_loss=train_loss,
        final_val_loss=val_loss,
        val_relative_l2=val_error,
        baseline_relative_l2=baseline,
        samples_per_s=totals["timed_steps"] * cfg.batch_size / totals["train_time"],
        data_wait_share=totals["wait_time"] / totals["train_time"],
        wall_time_s=totals["wall_time"] + time.perf_counter() - start,
        steps=step,
        processes=totals["processes"],
    )
    checkpoint(cfg.num_epochs, 0)
    return summary


def format_seconds(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, math.ceil(seconds))))


def main(argv=None):
    cfg = common.load_config(Path(__file__).with_name("config.yaml"), argv, LIMITS)
    out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir)
    earlier = checkpoints.set_aside_earlier_run(out_dir) if cfg.resume == "none" else None
    common.setup_logging(out_dir, STAGE)
    log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
    if earlier:
        log.info(f"--resume none: moved the earlier run's files to {earlier} (delete it when you no longer need it)")
    summary = train(cfg, out_dir)
    if summary is None:
        sys.exit(3)  # not 0: the run stopped early, with a checkpoint to resume from
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
    except Exception as error:  # a worker that died, or an unexpected error (a GPU out of memory, say): end now
        data_loading.end_workers()  # first: another worker ending now would raise again inside this handler
        reason = data_loading.known_failure(error)
        if reason is None:
            traceback.print_exc()  # (left uncaught, the error would keep the DataLoader alive, and its workers with it)
        sys.exit(f"error: {reason}" if reason else 1)
    finally:
        data_loading.end_workers()
