"""Stage 10: when a distributed run breaks. Every rank writes the stack of each of its threads to
<out_dir>/stacks/rank<r>.txt on `kill -USR2 <pid>`, also while it waits in a collective, and a watchdog thread warns
when a step takes far longer than the recent ones, before ddp_timeout_s ends the run. clinic.py causes each failure.

    torchrun --standalone --nproc_per_node 2 stages/10_diagnose/train.py --config quick
    python stages/10_diagnose/clinic.py stopped-rank        # a failure, caused from outside: what you see, and why
    sbatch -A <account> stages/10_diagnose/submit_pm.sh --config default
"""

import collections
import contextlib
import dataclasses
import logging
import math
import signal
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import batch_scaling
import checkpoints
import common
import data_loading
import diagnose
import distributed
import profiling
import speedups
import sweeps
import tracking

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)
RENAMED = {"batch_size": "global_batch_size", "lr": "base_lr"}  # earlier stages' names, for the error that names ours


@dataclasses.dataclass
class TrainingState:
    """The model, what trains it, and where the run stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ddp_model: torch.nn.Module | None = None  # the model in DDP, for its no_sync (None: one process alone)
    step_model: torch.nn.Module | None = None  # what a step calls, set once the checkpoint is loaded
    epoch: int = 0
    batch_in_epoch: int = 0  # the batches of this epoch trained so far
    step: int = 0
    epoch_loss: float = 0.0  # the sum of this epoch's batch losses so far
    best_val_loss: float = math.inf
    processes: int = 0  # the processes that trained this run: one more at each resume


# What stays the same while the run trains, read-only (a namedtuple): start_run makes it, the steps read it.
RunSetup = collections.namedtuple(
    "RunSetup",
    "cfg out_dir device dtype rank world_size train_set sampler train_loader val_loader batches_per_epoch "
    "accumulation resumed_from writer wandb_run",
)


def build_training_state(cfg, device, batches_per_epoch, dtype):
    """The model, and the optimizer, learning-rate schedule and loss scaler that train it."""
    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    fused = device.type == "cuda"  # one GPU kernel for the whole update instead of several per parameter
    peak_lr = batch_scaling.peak_lr(cfg)  # base_lr, scaled for the global batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = batch_scaling.make_scheduler(optimizer, cfg, batches_per_epoch)
    # fp16 only: scale the loss up so that small gradients do not round to zero in 16 bits (a no-op otherwise)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    log.info(f"{common.count_parameters(model):,} parameters on {common.hardware(device)}; precision "
             f"{cfg.precision}, tf32 {cfg.tf32}, compile {cfg.compile}, fused AdamW {fused}")  # fmt: skip
    return TrainingState(model, optimizer, scheduler, scaler)


def train_step(setup, state, batches):
    """One optimizer step on this process's share of a batch, in micro-batches; returns the step's loss, a tensor:
    reading it would wait for the GPU."""
    state.optimizer.zero_grad(set_to_none=True)
    device, dtype, accumulation = setup.device, setup.dtype, setup.accumulation
    loss = torch.zeros((), device=device)
    for micro in range(accumulation):  # backward adds each micro-batch's gradients to the ones before
        with profiling.part("data wait", device):  # the named parts of a step, for its profile (--profile_steps)
            delta, phi = next(batches)
            delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)  # overlaps compute
        # DDP averages the gradients over the ranks in every backward; once per step is enough: the last one
        sync = micro == accumulation - 1 or state.ddp_model is None
        with contextlib.nullcontext() if sync else state.ddp_model.no_sync():
            with profiling.part("forward", device), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                micro_loss = torch.nn.functional.mse_loss(state.step_model(delta).float(), phi) / accumulation
            with profiling.part("backward", device):  # with DDP, the all-reduces run while backward goes on
                state.scaler.scale(micro_loss).backward()
        loss += micro_loss.detach()  # the mean over the step's micro-batches
    with profiling.part("optimizer", device):
        state.scaler.step(state.optimizer)  # unscales the gradients; skips the update if one is inf or NaN (fp16)
        state.scaler.update()  # the scale shrinks after an overflow and grows after 2000 good steps
        state.scheduler.step()
    state.step += 1
    state.batch_in_epoch += 1
    state.epoch_loss += loss  # no .item(): the CPU queues the next step without waiting for the GPU
    return loss


def raise_if_diverged(loss, state, data_dir):
    if not math.isfinite(loss):
        common.check_data_finite(data_dir)  # a NaN in the data is no matter of the learning rate
        raise common.UserError(f"the loss is {loss} at step {state.step}: training diverged at lr "
                               f"{state.scheduler.get_last_lr()[0]:.2e}; try a smaller --base_lr, another "
                               "--lr_scaling, or more --warmup_epochs")  # fmt: skip


def save_checkpoint(setup, state, timer):
    """Every rank calls this (an all-reduce and a barrier); rank 0 writes the checkpoint."""
    (epoch_loss,) = distributed.all_reduce_mean(state.epoch_loss)  # each rank's sum: an equal share for each
    path = None
    if setup.rank == 0:
        path = write_checkpoint(setup, state, timer, epoch_loss)
    distributed.barrier()  # no rank exits (and gets rank 0 killed by its launcher) before the file is saved
    return path


def write_checkpoint(setup, state, timer, epoch_loss):
    """What a bit-exact resume needs: the weights, the optimizer's, schedule's and scaler's states, the random
    generators', where the run stands; and what defines the run: its settings and its data."""
    saved = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
    saved |= {"scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict()}
    saved |= {"rng": checkpoints.rng_states(), "threads": torch.get_num_threads()}
    saved |= {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "step": state.step}
    saved |= {"epoch_loss": epoch_loss, "best_val_loss": state.best_val_loss, "processes": state.processes}
    saved |= {"totals": timer.totals_now(), "wandb_run_id": setup.wandb_run and setup.wandb_run.id}
    saved |= {"settings": checkpoints.run_settings(setup.cfg), "data": common.data_identity(setup.train_set.meta)}
    folder, keep_last = setup.out_dir / "checkpoints", setup.cfg.keep_last
    return checkpoints.save_checkpoint(folder, saved, keep_last, keep=setup.resumed_from)


def resume(state, cfg, out_dir, data, device):
    """Continue from the newest good checkpoint of this run (or the one --resume names), if there is one: load every
    state it holds, the random generators' too. Returns the checkpoint (None for a new run) and its path."""
    saved, path = checkpoints.load_checkpoint(cfg.resume, out_dir / "checkpoints", checkpoints.run_settings(cfg), data)
    if saved is None:
        return None, None
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.scaler.load_state_dict(saved["scaler"])
    checkpoints.set_rng_states(saved["rng"])
    state.epoch, state.batch_in_epoch, state.step = saved["epoch"], saved["batch_in_epoch"], saved["step"]
    state.epoch_loss, state.best_val_loss = saved["epoch_loss"], saved["best_val_loss"]
    state.processes = saved["processes"]
    if device.type == "cpu" and saved["threads"] != torch.get_num_threads():  # see the README: bit-exact resume
        log.warning(f"{torch.get_num_threads()} CPU threads now, {saved['threads']} before: results may differ")
    return saved, path


@torch.no_grad()
def validate(model, loader, device, dtype):
    """Every rank calls this (an all-reduce): the mean loss and relative L2 error over the validation set, each rank
    validating its share, and a batch for a picture."""
    model.eval()
    loss_sum, error_sum, count = 0.0, 0.0, 0
    for delta, phi in loader:
        delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            prediction = model(delta).float()
        loss_sum += torch.nn.functional.mse_loss(prediction, phi, reduction="sum") / phi[0].numel()
        error_sum += common.relative_l2(prediction, phi) * len(phi)
        count += len(phi)
    model.train()
    loss_sum, error_sum, count = distributed.all_reduce_mean(loss_sum, error_sum, count)  # one wait for the GPU
    return loss_sum / count, error_sum / count, (delta, phi, prediction)


def agree_across_ranks(loss, wait):
    """Every rank calls this, at the same steps (an all-reduce): the loss and the data wait averaged over the ranks,
    and whether any rank was asked to stop. So all stop at the same step, and a NaN on one stops all."""
    loss, wait, stops = distributed.all_reduce_mean(loss, wait, checkpoints.stop_signal is not None)
    return loss, wait, stops > 0


def log_progress(setup, state, loss, timer, wait):
    """The progress line; TensorBoard and W&B on rank 0 (the others have neither). wait: the window's data wait."""
    samples_per_s, wait, eta = timer.window(state.step, wait)  # wait: now the share of the time spent waiting
    lr, total_steps = state.scheduler.get_last_lr()[0], setup.cfg.num_epochs * setup.batches_per_epoch
    log.info(f"step {state.step}/{total_steps} | epoch {state.epoch + 1} | loss {loss:.4f} | lr {lr:.2e} | "
             f"{samples_per_s:.0f} samples/s | data wait {wait:.0%} | ETA {eta}")  # fmt: skip
    scalars = {"train/loss": loss, "train/lr": lr, "perf/samples_per_s": samples_per_s, "perf/data_wait_share": wait}
    if setup.writer is None:
        return
    for name, value in scalars.items():
        setup.writer.add_scalar(name, value, state.step)
    tracking.log_metrics(setup.wandb_run, state.step, scalars)


def log_validation(setup, state, train_loss, val_loss, val_error, examples):
    baseline = setup.train_set.meta["baseline_rel_l2"]
    log.info(f"epoch {state.epoch + 1}/{setup.cfg.num_epochs} | train loss {train_loss:.4f} | val loss "
             f"{val_loss:.4f} | val relative L2 error {val_error:.3f} (baseline {baseline:.3f})")  # fmt: skip
    if setup.writer is None:
        return
    scalars, image = {"val/loss": val_loss, "val/relative_l2": val_error}, common.prediction_panel(*examples)
    for name, value in scalars.items():
        setup.writer.add_scalar(name, value, state.step)
    setup.writer.add_image("val/delta_truth_prediction_error", image, state.step)
    image_due = tracking.image_due(state.step, setup.cfg.wandb_image_every, setup.batches_per_epoch)
    tracking.log_metrics(setup.wandb_run, state.step, scalars, image if image_due else None)


def save_best(setup, state, val_loss):
    """best.pt: the weights of the lowest validation loss so far, kept apart from the checkpoints (predict.py)."""
    if val_loss >= state.best_val_loss:  # the same on every rank: the mean over all of them
        return
    state.best_val_loss = val_loss
    best = {"model": state.model.state_dict(), "settings": checkpoints.run_settings(setup.cfg), "step": state.step}
    if setup.rank == 0:
        checkpoints.save_atomically(best | {"val_loss": val_loss}, setup.out_dir / "checkpoints" / "best.pt")


def start_run(cfg, out_dir, device, dtype, rank, world_size, launcher):
    """Every rank calls this (collectives): the data, the model resumed from its checkpoint, rank 0's outputs."""
    torch.manual_seed(cfg.seed)
    data_dir = distributed.ensure_data_once(cfg.data_preset, cfg.data_root, rank)
    micro_batch, accumulation = batch_scaling.micro_batches(cfg, world_size)
    loaders = data_loading.make_loaders(cfg, data_dir, device, micro_batch, rank, world_size)
    train_set, sampler = loaders[:2]
    batches_per_epoch = len(train_set) // cfg.global_batch_size  # optimizer steps per epoch
    state = build_training_state(cfg, device, batches_per_epoch, dtype)
    saved, resumed_from = resume(state, cfg, out_dir, common.data_identity(train_set.meta), device)
    state.processes += 1
    distributed.check_same_on_every_rank({**checkpoints.run_settings(cfg), "data": train_set.meta, "step": state.step})
    # DDP starts by sending rank 0's weights to all (the same start everywhere); during backward it averages the
    # gradients over the ranks, bucket by bucket, while backward goes on. (GroupNorm keeps no running statistics:
    # there are no buffers that DDP would have to send at every step, as it must for BatchNorm.)
    state.ddp_model = torch.nn.parallel.DistributedDataParallel(state.model) if launcher else None
    model = state.ddp_model or state.model
    # The compiled model shares model's weights; checkpoints save model, so they load with or without compile.
    state.step_model = torch.compile(model) if cfg.compile else model
    writer, wandb_run = None, None  # rank 0 alone writes: events, checkpoints, summary, W&B
    if rank == 0:
        checkpoints.make_folder(out_dir)
        branch = checkpoints.set_aside_newer_work(out_dir, resumed_from, state.step)
        continued = None if branch or saved is None else saved["wandb_run_id"]  # the W&B run of the checkpoint
        wandb_run = tracking.start(cfg, out_dir, continued, f"{STAGE}-{cfg.config}")
        writer = SummaryWriter(out_dir / "tensorboard", purge_step=state.step + 1)  # drop events after the checkpoint
    checkpoints.catch_stop_signals()  # from Slurm before the time limit, scancel, Ctrl-C: see checkpoints.py
    log.info(f"{world_size} process(es), launcher {launcher or 'none'}: {sampler.local_batch} samples of each batch "
             f"of {cfg.global_batch_size} per process, in {accumulation} micro-batch(es) of {micro_batch}")  # fmt: skip
    log.info(f"physics baseline (linear solve): relative L2 error {train_set.meta['baseline_rel_l2']:.3f}")
    setup = RunSetup(cfg, out_dir, device, dtype, rank, world_size, *loaders, batches_per_epoch, accumulation,
                     resumed_from, writer, wandb_run)  # fmt: skip
    total_steps = cfg.num_epochs * batches_per_epoch
    timer = common.StepTimer(cfg.global_batch_size, total_steps, log, totals=saved["totals"] if saved else None)
    return setup, state, timer


def train(setup, state, timer):
    """Every rank calls this (collectives at the same steps): the loop. True: it stopped early, with a checkpoint."""
    cfg = setup.cfg
    if state.epoch == cfg.num_epochs:
        log.info(f"finished already at step {state.step}: the figures below are that run's; --resume none trains again")
        return False
    profiler = None  # torch.profiler, while --profile_steps run
    for epoch in range(state.epoch, cfg.num_epochs):
        state.epoch = epoch
        setup.sampler.set_epoch(epoch, state.batch_in_epoch)
        batches = timer.timed(setup.train_loader)
        for _ in range(state.batch_in_epoch, setup.batches_per_epoch):
            diagnose.step_begins(state.step)  # the watchdog warns if this step takes far longer than the recent ones
            profiler = profiling.next_step(profiler, setup, state)
            if state.step + 1 == cfg.signal_at_step and setup.rank == 0:
                signal.raise_signal(signal.SIGUSR1)  # to try it out: Slurm's signal, to one rank only, during a step
            loss = train_step(setup, state, batches)
            timer.step_done()
            end_of_epoch = state.batch_in_epoch == setup.batches_per_epoch
            log_now = timer.steps and (state.step % cfg.log_every == 0 or end_of_epoch)
            checkpoint_now = state.step % cfg.checkpoint_every == 0
            alone_and_asked = checkpoints.stop_signal and setup.world_size == 1  # nobody to agree with: stop now
            if not (log_now or checkpoint_now or end_of_epoch or alone_and_asked):
                continue  # the ranks agree at the same steps (an all-reduce waits for all): only at these
            loss, wait, stop = agree_across_ranks(loss, timer.wait)
            raise_if_diverged(loss, state, setup.train_set.path.parent)  # before a checkpoint: never NaN weights
            if log_now:
                log_progress(setup, state, loss, timer, wait)
            if stop or checkpoint_now:
                diagnose.other_work(f"the checkpoint of step {state.step}")  # not a step: slow only much later
                path = save_checkpoint(setup, state, timer)
            if stop:
                advice = checkpoints.how_to_resume(cfg.resume)
                asked = checkpoints.stop_signal or "a stop signal to another process"
                log.info(f"{asked} received: saved {path} at step {state.step}; {advice}")
                return True

        diagnose.other_work(f"the validation after step {state.step}")
        train_loss = distributed.all_reduce_mean(state.epoch_loss)[0] / setup.batches_per_epoch  # over all ranks
        val_loss, val_error, examples = validate(state.step_model, setup.val_loader, setup.device, setup.dtype)
        log_validation(setup, state, train_loss, val_loss, val_error, examples)
        save_best(setup, state, val_loss)
        state.epoch, state.batch_in_epoch, state.epoch_loss = epoch + 1, 0, 0.0
        if state.epoch < cfg.num_epochs:  # the last one is saved after the summary: a finished run has both
            save_checkpoint(setup, state, timer)

    if setup.rank == 0:
        figures = {"final_train_loss": train_loss, "final_val_loss": val_loss, "val_relative_l2": val_error}
        figures |= {"baseline_relative_l2": setup.train_set.meta["baseline_rel_l2"], "steps": state.step}
        figures |= {"processes": state.processes, "world_size": setup.world_size}
        figures |= {"micro_batches_per_step": setup.accumulation, "peak_lr": batch_scaling.peak_lr(cfg)}
        figures |= {"warmup_steps": batch_scaling.warmup_steps(cfg, setup.batches_per_epoch)}
        common.write_summary(setup.out_dir, STAGE, cfg, setup.device, **figures, **timer.summary())
    save_checkpoint(setup, state, timer)
    return False


def main(argv=None):
    config_file = Path(__file__).with_name("config.yaml")
    cfg = common.load_config(config_file, argv, renamed=RENAMED, environment=tracking.ENVIRONMENT)
    rank, local_rank, world_size, launcher = distributed.ranks_from_launcher()
    data_loading.check_global_batch(cfg, world_size)  # before any process waits for another
    device = distributed.device_for(cfg.device, local_rank)
    distributed.init_process_group(launcher, rank, world_size, device, cfg.ddp_timeout_s)
    # A sweep trial's settings reach rank 0 (from the W&B agent, or from its trial file after a requeue); every
    # rank gets them from rank 0, and trains them.
    trial = sweeps.this_trial(cfg, sys.argv[1:] if argv is None else argv, rank)
    if trial:
        cfg = common.load_config(config_file, trial["arguments"], renamed=RENAMED, environment=tracking.ENVIRONMENT)
    tracking.check_names(cfg)  # on every rank: a name W&B would refuse stops them all, before they start
    out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir, create=rank == 0)  # the others write only their stacks
    earlier = checkpoints.set_aside_earlier_run(out_dir) if cfg.resume == "none" and rank == 0 else None
    distributed.setup_logging(out_dir, STAGE, rank)  # the other ranks print only warnings and errors
    distributed.barrier()  # rank 0 has set an earlier run aside: each rank's stacks file goes into this one
    diagnose.write_stacks_on_signal(out_dir, rank)  # before anything can hang, and before the DataLoader workers start
    log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
    if earlier:
        log.info(f"--resume none: moved the earlier run's files to {earlier} (delete it when you no longer need it)")
    if cfg.deterministic:
        checkpoints.make_deterministic()
    dtype = speedups.choose_precision(cfg, device)
    setup, state, timer = start_run(cfg, out_dir, device, dtype, rank, world_size, launcher)
    diagnose.start_watchdog(rank, cfg.ddp_timeout_s)
    code = 3 if train(setup, state, timer) else 0  # 3, not 0: the run stopped early, with a checkpoint to resume from
    diagnose.other_work("the end of the run")
    if rank == 0:
        setup.writer.close()
        tracking.finish(setup.wandb_run, code)
        sweeps.record_exit_code(cfg, code)
    distributed.destroy_process_group()
    if code:
        sys.exit(code)
    if rank == 0:
        common.log_done(log, common.read_summary(out_dir), out_dir)


if __name__ == "__main__":
    known_failures = [data_loading.known_failure, speedups.compile_failure, distributed.known_failure]
    cleanup = [data_loading.end_workers, tracking.finish_after_failure]  # a failed run: W&B's exit code 1
    common.run_main(main, distributed.ranks_from_launcher()[0], known_failures, cleanup)
