"""Stage 07: the global batch as a knob. A larger batch takes fewer, larger steps: the learning rate grows with it
(linear or square-root rule), after a warmup, and a batch larger than the processes can hold at once is
accumulated from micro-batches.

    python stages/07_large_batch/train.py --config bs512 --data_preset tiny --num_epochs 2   # a laptop: accumulates
    sbatch -A <account> stages/07_large_batch/submit_pm.sh --config bs512                    # 4 GPUs of a node
    python stages/07_large_batch/study.py --preset small                                     # the batch-size study
"""

import contextlib
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `common` from any working directory
import batch_scaling
import checkpoints
import common
import data_loading
import distributed

STAGE = Path(__file__).parent.name
log = logging.getLogger(STAGE)
# The values each setting may take, checked when the config is read: a bad one stops with a one-line error.
LIMITS = {"data_preset": list(common.PRESETS), "seed": ">= 0", "base_channels": ">= 1", "depth": ">= 1",
          "base_lr": "> 0", "base_batch_size": ">= 1", "global_batch_size": ">= 1", "micro_batch_size": ">= 0",
          "lr_scaling": ["none", "linear", "sqrt"], "warmup_epochs": ">= 0", "weight_decay": ">= 0",
          "num_epochs": ">= 1", "log_every": ">= 1", "checkpoint_every": ">= 1", "keep_last": ">= 1",
          "signal_at_step": ">= 0", "num_workers": ">= -1", "prefetch_factor": ">= 1",
          "precision": ["auto", "fp32", "bf16", "fp16"], "ddp_timeout_s": "> 0"}  # fmt: skip
RENAMED = {"lr": "base_lr", "batch_size": "global_batch_size"}  # stage 06's names, for the error that names ours
# Settings a resumed run may change. All the others define the run: a checkpoint resumes only with the same.
# (The loader's settings change how fast batches come, never what is in them: see tests/test_data_loading.py.
# compile changes how the same arithmetic runs; precision and tf32 change the arithmetic, so they define the run.
# micro_batch_size changes how many samples are computed at once, not the step: it follows the memory at hand.)
MAY_CHANGE_ON_RESUME = {"config", "data_root", "out_dir", "device", "log_every", "checkpoint_every", "keep_last",
                        "resume", "signal_at_step", "num_workers", "pin_memory", "persistent_workers",
                        "prefetch_factor", "compile", "ddp_timeout_s", "micro_batch_size"}  # fmt: skip
stop_signal = None  # set by the signal handler; the ranks agree to stop at their next comparison of notes


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


def autocast_dtype(precision, device):
    """The 16-bit type autocast computes in (None: float32 everywhere). auto: bf16 on a GPU that has it, fp16 on an
    older GPU; float32 on a CPU, where bf16 ran 5 times slower than float32 on ours (see the README)."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def use_tf32(enabled):
    """TF32: float32 matrix products and convolutions on the tensor cores of an A100 or newer, with a 10-bit
    mantissa. Every switch of both of PyTorch's APIs: the old allow_tf32 flags, then (PyTorch 2.9 and newer) the
    fp32_precision ones. With only some of the new ones set, reading the old flags raises (PyTorch 2.14)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cudnn.rnn.fp32_precision = precision


def run_settings(cfg):
    """The settings that define this run; they are stored in every checkpoint."""
    return {key: value for key, value in vars(cfg).items() if key not in MAY_CHANGE_ON_RESUME}


@torch.no_grad()
def validate(model, loader, device, dtype):
    """Mean loss and relative L2 error over the validation set (each rank its share), and a batch for a picture."""
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
    loss_sum, error_sum, count = distributed.sum_over_ranks(loss_sum, error_sum, count, device=device)  # one wait
    return loss_sum / count, error_sum / count, (delta, phi, prediction)


def train(cfg, out_dir, rank, local_rank, world_size, launcher):
    if cfg.deterministic:
        make_deterministic()
    device = distributed.device_for(cfg.device, local_rank)
    dtype = autocast_dtype(cfg.precision, device)
    cfg.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]  # auto: what it chose
    use_tf32(cfg.tf32)
    torch.manual_seed(cfg.seed)
    micro_batch, accumulation = batch_scaling.micro_batches(cfg, world_size)
    data_dir = distributed.ensure_data_once(cfg.data_preset, cfg.data_root, rank)
    distributed.start(launcher, rank, world_size, device, cfg.ddp_timeout_s)
    train_set, sampler, train_loader, val_loader = data_loading.make_loaders(cfg, data_dir, device, micro_batch,
                                                                             rank, world_size)
    batches_per_epoch = len(train_set) // cfg.global_batch_size  # optimizer steps per epoch
    baseline = train_set.meta["baseline_rel_l2"]

    model = common.UNet(cfg.base_channels, cfg.depth).to(device)
    fused = device.type == "cuda"  # one GPU kernel for the whole update instead of several per parameter
    peak_lr = batch_scaling.peak_lr(cfg)  # base_lr, scaled for the global batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=cfg.weight_decay, fused=fused)
    # fp16 only: scale the loss up so that small gradients do not round to zero in 16 bits (a no-op otherwise)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    total_steps = cfg.num_epochs * batches_per_epoch
    scheduler, warmup_steps = batch_scaling.make_scheduler(optimizer, cfg, batches_per_epoch, total_steps)

    checkpoint_dir = out_dir / "checkpoints"
    start_epoch, first_batch, step, epoch_loss, best_val_loss = 0, 0, 0, 0.0, math.inf
    # Summed over every process of this run, so that summary.json describes the whole run.
    totals = {"train_time": 0.0, "wait_time": 0.0, "timed_steps": 0, "wall_time": 0.0, "processes": 0,
              "first_step_time": 0.0}  # fmt: skip
    data = common.data_identity(train_set.meta)
    state, resumed_from = checkpoints.load_checkpoint(cfg.resume, checkpoint_dir, run_settings(cfg), data)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        checkpoints.set_rng_states(state["rng"])
        start_epoch, first_batch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        epoch_loss, best_val_loss, totals = state["epoch_loss"], state["best_val_loss"], state["totals"]
        if device.type == "cpu" and state["threads"] != torch.get_num_threads():  # see the README: bit-exact resume
            log.warning(f"{torch.get_num_threads()} CPU threads now, {state['threads']} before: results may differ")
    distributed.check_same_on_every_rank({**run_settings(cfg), "data set": train_set.meta, "resumed at step": step})
    # DDP starts by sending rank 0's weights to all (the same start everywhere); during backward it averages the
    # gradients over the ranks, bucket by bucket, while backward goes on. (GroupNorm keeps no running statistics:
    # there are no buffers that DDP would have to send at every step, as it must for BatchNorm.)
    ddp_model = DistributedDataParallel(model) if launcher else model
    # The compiled model shares model's weights; checkpoints save model, so they load with or without compile.
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    totals["processes"] += 1
    writer = None  # rank 0 alone writes: TensorBoard events, checkpoints, best.pt and the summary
    if rank == 0:
        try:
            checkpoint_dir.mkdir(exist_ok=True)
        except OSError as error:
            raise common.UserError(f"cannot write checkpoints to {checkpoint_dir} ({error.strerror}): "
                                   "choose another --out_dir") from None  # fmt: skip
        branch = checkpoints.set_aside_newer_work(out_dir, resumed_from, step)
        if branch:
            log.info(f"resumed from an older checkpoint: a new branch; the newer work moved to {branch} (nothing lost)")
        writer = SummaryWriter(out_dir / "tensorboard", purge_step=step + 1)  # drop events after the checkpoint

    def checkpoint(epoch, batch_in_epoch):
        # Each rank's running sum of its losses: summed over the ranks, an equal share of it stored for each
        (global_epoch_loss,) = distributed.sum_over_ranks(epoch_loss, device=device)
        path = None
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "rng": checkpoints.rng_states(), "epoch": epoch,
                     "batch_in_epoch": batch_in_epoch, "step": step, "epoch_loss": global_epoch_loss / world_size,
                     "best_val_loss": best_val_loss, "settings": run_settings(cfg),
                     "totals": {**totals, "wall_time": totals["wall_time"] + time.perf_counter() - start},
                     "threads": torch.get_num_threads(), "data": data}  # fmt: skip
            path = checkpoints.save_checkpoint(checkpoint_dir, state, cfg.keep_last, keep=resumed_from)
        distributed.wait_for_all()  # no rank exits (and gets rank 0 killed by its launcher) before the file is saved
        return path

    signal.signal(signal.SIGUSR1, request_stop)  # Slurm, --signal=B:USR1@<seconds> via submit_pm.sh
    signal.signal(signal.SIGTERM, request_stop)  # preemption, scancel
    signal.signal(signal.SIGINT, request_stop)  # Ctrl-C
    log.info(f"{common.count_parameters(model):,} parameters on {common.hardware(device)}; {total_steps} steps")
    log.info(f"{world_size} process(es), launcher {launcher or 'none'}: {sampler.local_batch} samples of each batch "
             f"of {cfg.global_batch_size} per process, in {accumulation} micro-batch(es) of {micro_batch}")
    log.info(f"peak lr {peak_lr:.2e} ({cfg.lr_scaling} rule, base_lr {cfg.base_lr:.2e} at batch "
             f"{cfg.base_batch_size}), {warmup_steps} warmup steps, then cosine to 0")
    log.info(f"precision {cfg.precision}, tf32 {cfg.tf32}, compile {cfg.compile}, fused AdamW {fused}")
    log.info(f"physics baseline (linear solve): relative L2 error {baseline:.3f} on the validation set")

    if start_epoch == cfg.num_epochs:
        log.info(f"this run finished already (step {step}): pass --resume none to train again from scratch")
        return common.read_summary(out_dir)
    start = time.perf_counter()
    first_step_done, stop = False, False
    for epoch in range(start_epoch, cfg.num_epochs):
        sampler.set_epoch(epoch, first_batch)
        window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
        loader = iter(train_loader)
        for batch_index in range(first_batch, batches_per_epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for micro in range(accumulation):  # backward adds each micro-batch's gradients to the ones before
                wait_start = time.perf_counter()
                delta, phi = next(loader)
                window_wait += time.perf_counter() - wait_start  # time spent waiting for this micro-batch
                delta, phi = delta.to(device, non_blocking=True), phi.to(device, non_blocking=True)
                # DDP averages the gradients over the ranks in every backward; once per step is enough: the last one
                sync = micro == accumulation - 1 or launcher is None
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        micro_loss = torch.nn.functional.mse_loss(step_model(delta).float(), phi) / accumulation
                    scaler.scale(micro_loss).backward()
                loss += micro_loss.detach()  # the mean over the step's micro-batches
                if step + 1 == cfg.signal_at_step and micro == 0 and rank == 0:  # to try it out, during a step
                    os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm would, but to one process only
            scaler.step(optimizer)  # unscales the gradients; skips the update if one is inf or NaN (fp16 overflow)
            scaler.update()  # the scale shrinks after an overflow and grows after 2000 good steps
            scheduler.step()
            step += 1
            window_steps += 1
            epoch_loss += loss.detach()  # no .item() here: the CPU queues the next step without waiting for the GPU

            if not first_step_done:  # it compiles (--compile true) and starts the workers: timed apart
                loss.item()  # wait for the GPU to finish the step
                first_step_done, first_step_time = True, time.perf_counter() - window_start
                totals["first_step_time"] += first_step_time
                log.info(f"first step: {first_step_time:.1f} s, not counted in samples/s")
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()

            # The ranks compare notes at the same steps (a collective waits for all): the mean loss, and whether any
            # of them was asked to stop. So all stop at the same step, and a NaN stops all, before any checkpoint.
            # (Only here, between optimizer steps: a stop never splits a step's micro-batches.)
            end_of_epoch = batch_index == batches_per_epoch - 1
            alone_and_asked = stop_signal is not None and launcher is None  # nobody to agree with: stop now
            if alone_and_asked or end_of_epoch or step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0:
                loss_sum, wait_sum, stops = distributed.sum_over_ranks(loss, window_wait, stop_signal is not None,
                                                                       device=device)  # fmt: skip
                mean_loss, stop = loss_sum / world_size, stops > 0
                raise_if_diverged(mean_loss, step, scheduler.get_last_lr()[0], train_set.path.parent)
            # Every log_every steps of the run (the first step is timed apart, so counting the window's would shift)
            if window_steps and (step % cfg.log_every == 0 or end_of_epoch):
                elapsed = time.perf_counter() - window_start
                samples_per_s = window_steps * cfg.global_batch_size / elapsed
                wait_share = wait_sum / world_size / elapsed  # the mean over the ranks
                eta = (total_steps - step) * elapsed / window_steps
                lr = scheduler.get_last_lr()[0]
                log.info(
                    f"step {step}/{total_steps} | epoch {epoch + 1} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                    f"{samples_per_s:.0f} samples/s | data wait {wait_share:.0%} | ETA {format_seconds(eta)}"
                )
                add_scalars(writer, step, {"train/loss": mean_loss, "train/lr": lr, "perf/samples_per_s": samples_per_s,
                                           "perf/data_wait_share": wait_share})  # fmt: skip
                totals["train_time"] += elapsed
                totals["wait_time"] += window_wait
                totals["timed_steps"] += window_steps
                window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
            if stop or step % cfg.checkpoint_every == 0:
                path = checkpoint(epoch, batch_index + 1)
            if stop:
                log.info(f"{stop_signal or 'a stop signal to another process'} received: saved {path} at step {step}; "
                         f"{checkpoints.how_to_resume(cfg.resume)}")  # fmt: skip
                add_scalars(writer, step, {})  # closes the event file
                return None

        val_loss, val_error, examples = validate(step_model, val_loader, device, dtype)
        (epoch_loss_sum,) = distributed.sum_over_ranks(epoch_loss, device=device)
        train_loss = epoch_loss_sum / world_size / batches_per_epoch
        log.info(
            f"epoch {epoch + 1}/{cfg.num_epochs} | train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
            f"val relative L2 error {val_error:.3f} (baseline {baseline:.3f})"
        )
        add_scalars(writer, step, {"val/loss": val_loss, "val/relative_l2": val_error},
                    image=common.prediction_panel(*examples) if writer else None)  # fmt: skip
        if val_loss < best_val_loss:  # the same on every rank: it is the mean over all of them
            best_val_loss = val_loss
            best = {"model": model.state_dict(), "settings": run_settings(cfg), "step": step, "val_loss": val_loss}
            if rank == 0:
                checkpoints.save_atomically(best, checkpoint_dir / "best.pt")
        first_batch, epoch_loss = 0, 0.0
        if epoch + 1 < cfg.num_epochs:  # the last one is saved after the summary: a finished run has both
            checkpoint(epoch + 1, 0)

    add_scalars(writer, step, {})
    summary = {} if rank != 0 else common.write_summary(
        out_dir,
        STAGE,
        cfg,
        device,
        final_train_loss=train_loss,
        final_val_loss=val_loss,
        val_relative_l2=val_error,
        baseline_relative_l2=baseline,
        samples_per_s=totals["timed_steps"] * cfg.global_batch_size / totals["train_time"],
        data_wait_share=totals["wait_time"] / totals["train_time"],
        wall_time_s=totals["wall_time"] + time.perf_counter() - start,
        first_step_s=totals["first_step_time"],
        steps=step,
        processes=totals["processes"],
        world_size=world_size,
        micro_batches_per_step=accumulation,
        peak_lr=peak_lr,
        warmup_steps=warmup_steps,
    )
    checkpoint(cfg.num_epochs, 0)
    return summary


def add_scalars(writer, step, scalars, image=None):
    """TensorBoard, on rank 0 only (the others have no writer). Nothing to add: the run ends, close the file."""
    if writer is None:
        return
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    if image is not None:
        writer.add_image("val/delta_truth_prediction_error", image, step)
    if not scalars:
        writer.close()


def raise_if_diverged(loss, step, lr, data_dir):
    if not math.isfinite(loss):
        common.check_data_finite(data_dir)  # a NaN in the data is no matter of the learning rate
        raise common.UserError(f"the loss is {loss} at step {step}: training diverged at lr {lr:.2e}; try a smaller "
                               "--base_lr, another --lr_scaling, or more --warmup_epochs")  # fmt: skip


def compile_failure(error):
    """One line for torch.compile failing (no C++ compiler on a CPU, no working Triton on a GPU), or None."""
    if not type(error).__module__.startswith(("torch._inductor", "torch._dynamo")):
        return None
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(("backend=", "Set "))]
    reason, text = (lines or [type(error).__name__])[0], str(error)
    need = "a C++ compiler (g++)" if "Cxx" in text or "C++" in text else "a working compiler toolchain"
    need = "a working Triton (pip install triton)" if "triton" in text.lower() else need
    return f"--compile true failed ({reason}): it needs {need}; install it, or pass --compile false"


def format_seconds(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(max(0, math.ceil(seconds))))


def main(argv=None):
    cfg = common.load_config(Path(__file__).with_name("config.yaml"), argv, LIMITS, RENAMED)
    rank, local_rank, world_size, launcher = distributed.launcher_place()
    if cfg.global_batch_size % world_size:
        raise common.UserError(f"--global_batch_size {cfg.global_batch_size} is shared by {world_size} processes: "
                               f"choose a multiple of {world_size}")  # fmt: skip
    if rank != 0:  # the others only read the run folder (to resume), and print only warnings and errors
        out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir, create=False)
        logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s")
    else:
        out_dir = common.run_dir(STAGE, cfg.config, cfg.out_dir)
        earlier = checkpoints.set_aside_earlier_run(out_dir) if cfg.resume == "none" else None
        common.setup_logging(out_dir, STAGE)
        log.info(f"stage {STAGE}, config {cfg.config!r}, writing to {out_dir}")
        if earlier:
            log.info(f"--resume none: moved the earlier run's files to {earlier} (delete it when no longer needed)")
    summary = train(cfg, out_dir, rank, local_rank, world_size, launcher)
    distributed.stop()  # not after an error: with a rank gone, it could wait for ever
    if summary is None:
        sys.exit(3)  # not 0: the run stopped early, with a checkpoint to resume from
    if rank == 0:
        log.info(
            f"done in {summary['wall_time_s']:.0f} s: val relative L2 error {summary['val_relative_l2']:.3f} "
            f"(baseline {summary['baseline_relative_l2']:.3f}), {summary['samples_per_s']:.0f} samples/s; "
            f"summary in {out_dir / 'summary.json'}"
        )


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        rank = distributed.launcher_place()[0]
        sys.exit(f"error: {error}" if rank == 0 else f"error on rank {rank}: {error}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted (Ctrl-C)")
    except Exception as error:  # another process or a worker died, or an unexpected error: end now
        data_loading.end_workers()  # first: another worker ending now would raise again inside this handler
        reason = data_loading.known_failure(error) or compile_failure(error) or distributed.known_failure(error)
        if reason is None:
            traceback.print_exc()  # (left uncaught, the error would keep the DataLoader alive, and its workers with it)
        rank = distributed.launcher_place()[0]
        sys.exit(1 if reason is None else f"error: {reason}" if rank == 0 else f"error on rank {rank}: {reason}")
    finally:
        data_loading.end_workers()
