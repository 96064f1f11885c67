"""Stage 07, the global batch as a knob: the learning rate each rule gives, gradient accumulation (the update of a
batch k times larger), a stop in the middle of an accumulation, and every named config in a short form."""

import math

import pytest
import torch
import yaml

from helpers import REPO, computed_once, output_of, run_python, stage_module
from test_checkpoint import assert_same_weights, final_weights
from test_ddp import assert_same_step

STAGE = REPO / "stages" / "07_large_batch"
CONFIGS = yaml.safe_load((STAGE / "config.yaml").read_text())
BATCH_CONFIGS = [name for name in CONFIGS if name.startswith("bs")]


def train(out_dir, data_root, *extra, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc] if nproc > 1 else []
    return run_python(*launcher, STAGE / "train.py", "--config", "test", "--out_dir", out_dir, "--data_root",
                      data_root, *extra, cwd=out_dir.parent)  # fmt: skip


def expected_lr(step, peak, start, warmup, total):
    """The documented schedule: from `start` linearly to `peak` over `warmup` steps, then a cosine to 0."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    return peak * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
@pytest.mark.parametrize("global_batch", [32, 64, 256, 512, 2048])
def test_the_learning_rate_at_key_steps_is_the_formula(rule, global_batch):
    """base_lr 2e-3 tuned at batch 64; 4 epochs of 8192 samples; 1 warmup epoch when the batch exceeds 64."""
    train, module = stage_module(STAGE), stage_module(STAGE, "batch_scaling")
    cfg = train.common.load_config(STAGE / "config.yaml", ["--global_batch_size", str(global_batch),
                                   "--base_batch_size", "64", "--base_lr", "2e-3", "--lr_scaling", rule,
                                   "--warmup_epochs", "1", "--num_epochs", "4"])  # fmt: skip
    k = global_batch / 64
    peak = 2e-3 * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[rule]
    assert module.peak_lr(cfg) == pytest.approx(peak, rel=1e-12)
    steps_per_epoch = 8192 // global_batch
    total = 4 * steps_per_epoch
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=module.peak_lr(cfg))
    scheduler = module.make_scheduler(optimizer, cfg, steps_per_epoch)
    warmup = module.warmup_steps(cfg, steps_per_epoch)
    assert warmup == (steps_per_epoch if global_batch > 64 else 0)
    learning_rates = []
    for _ in range(total + 1):
        learning_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    start = 2e-3 if warmup else peak
    middle = warmup + (total - warmup) // 2
    key_steps = {"start": 0, "half of the warmup": warmup // 2, "end of warmup (peak)": warmup,
                 "middle of the decay": middle, "last step": total - 1, "end": total}  # fmt: skip
    for name, step in key_steps.items():
        expected = expected_lr(step, peak, start, warmup, total)
        assert learning_rates[step] == pytest.approx(expected, rel=1e-9, abs=1e-15), f"{name} (step {step})"
    assert learning_rates[warmup] == pytest.approx(peak) and learning_rates[middle] == pytest.approx(peak / 2)
    assert learning_rates[0] == pytest.approx(2e-3 if warmup else peak) and learning_rates[total] == 0


def checkpoint_after_one_step(out_dir, data_root, *extra, nproc=1):
    """One optimizer step (the signal during step 1 stops the run after it, with a checkpoint), loaded."""
    result = train(out_dir, data_root, "--checkpoint_every", "1", "--signal_at_step", "1", *extra, nproc=nproc)
    assert "saved" in result.stdout and "at step 1;" in result.stdout, output_of(result)
    return torch.load(out_dir / "checkpoints" / "step-00000001.pt", weights_only=True), result.stdout


def test_accumulated_micro_batches_take_the_step_of_one_large_batch(tmp_path, tiny_data):
    """Global batch 32: one process computing it at once; one process in 4 micro-batches of 8; 2 processes, each
    in 4 micro-batches of 4 (DDP averages once, after the last). The same update, within assert_same_step's
    tolerance (the sums run in another order, so not bit for bit)."""
    whole, _ = checkpoint_after_one_step(tmp_path / "whole", tiny_data)
    accumulated, output = checkpoint_after_one_step(tmp_path / "accumulated", tiny_data, "--micro_batch_size", "8")
    assert "in 4 micro-batch(es) of 8" in output
    assert_same_step(whole, accumulated)
    two_ranks, output = checkpoint_after_one_step(tmp_path / "two", tiny_data, "--micro_batch_size", "4", nproc=2)
    assert "2 process(es), launcher torchrun: 16 samples of each batch of 32 per process, in 4 micro-batch(es) of 4" \
        in output, output
    assert_same_step(whole, two_ranks)


def test_a_stop_during_an_accumulation_waits_for_the_step_and_resumes_bit_exact(tmp_path, tiny_data,
                                                                                tmp_path_factory):  # fmt: skip
    """The signal arrives after the first of 4 micro-batches of step 5: the run finishes step 5 (its update is
    never split), saves, stops; the resumed run ends bit-identical to an uninterrupted one with those micro-batches."""
    accumulate = ["--micro_batch_size", "8"]

    def uninterrupted_run(folder):
        result = train(folder / "run", tiny_data, *accumulate)
        assert result.returncode == 0, output_of(result)

    reference = computed_once(tmp_path_factory, "07-accumulating", uninterrupted_run) / "run"
    out_dir = tmp_path / "run"
    stopped = train(out_dir, tiny_data, *accumulate, "--signal_at_step", "5")
    assert stopped.returncode == 3 and "SIGUSR1 received: saved" in stopped.stdout, output_of(stopped)
    assert "at step 5;" in stopped.stdout, "the stop came at the end of the step whose accumulation it interrupted"
    resumed = train(out_dir, tiny_data, *accumulate)
    assert resumed.returncode == 0 and "step-00000005.pt: epoch 1, step 5" in resumed.stdout, output_of(resumed)
    assert_same_weights(final_weights(out_dir), final_weights(reference))


@pytest.mark.parametrize(("processes", "micro", "plan"), [(1, 0, (512, 1)), (1, 64, (64, 8)), (4, 64, (64, 2)),
                                                          (8, 64, (64, 1)), (16, 64, (32, 1))])  # fmt: skip
def test_each_process_computes_its_share_in_micro_batches(processes, micro, plan):
    """Global batch 512: (micro-batch, micro-batches per step) of each process; 0 computes the share at once."""
    train, scaling = stage_module(STAGE), stage_module(STAGE, "batch_scaling")
    cfg = train.common.load_config(STAGE / "config.yaml", ["--config", "bs512", "--micro_batch_size", str(micro)])
    assert scaling.micro_batches(cfg, processes) == plan


def test_a_micro_batch_that_does_not_divide_the_share_of_a_process_is_refused():
    train, scaling = stage_module(STAGE), stage_module(STAGE, "batch_scaling")
    cfg = train.common.load_config(STAGE / "config.yaml", ["--config", "bs512", "--micro_batch_size", "96"])
    with pytest.raises(train.common.UserError, match="--micro_batch_size 96 must divide the 256 samples that each of "
                       "2 process.es. takes of --global_batch_size 512: choose a divisor of 256"):  # fmt: skip
        scaling.micro_batches(cfg, 2)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The `small` preset (4096 training samples, enough for a batch of 2048), generated once per session."""

    def generate(folder):
        result = run_python(REPO / "data" / "generate.py", "--preset", "small", "--data_root", folder, cwd=folder)
        assert result.returncode == 0, output_of(result)

    return computed_once(tmp_path_factory, "small-data", generate)


@pytest.mark.parametrize("name", BATCH_CONFIGS)
def test_every_named_batch_config_runs_in_a_short_form(name, tmp_path, small_data):
    """Each batch-size config as named (its data, batch, LR rule, warmup and epochs), with a tiny U-Net, for its
    first optimizer step (the signal stops it there, with a checkpoint): it runs, in micro-batches of 256, and
    its LR after that step is the formula's, in the warmup."""
    out_dir = tmp_path / "run"
    tiny_unet = ["--base_channels", "4", "--depth", "2"]
    result = run_python(STAGE / "train.py", "--config", name, *tiny_unet, "--signal_at_step", "1", "--data_root",
                        small_data, "--out_dir", out_dir, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 3 and "at step 1;" in result.stdout, output_of(result)
    state = torch.load(out_dir / "checkpoints" / "step-00000001.pt", weights_only=True)
    cfg = {**CONFIGS["default"], **CONFIGS[name]}
    assert state["settings"]["global_batch_size"] == cfg["global_batch_size"]
    micro_batch = min(cfg["micro_batch_size"], cfg["global_batch_size"])
    assert f"in {cfg['global_batch_size'] // micro_batch} micro-batch(es) of {micro_batch}" in result.stdout
    k = cfg["global_batch_size"] / cfg["base_batch_size"]
    peak = cfg["base_lr"] * {"linear": k, "sqrt": math.sqrt(k), "none": 1.0}[cfg["lr_scaling"]]
    steps_per_epoch = 4096 // cfg["global_batch_size"]
    warmup = round(cfg["warmup_epochs"] * steps_per_epoch) if k > 1 else 0
    expected = expected_lr(1, peak, cfg["base_lr"] if warmup else peak, warmup, cfg["num_epochs"] * steps_per_epoch)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(expected, rel=1e-9)


def test_the_study_compares_configs_by_time_to_the_target_and_draws_the_figure(tmp_path, tiny_data):
    """study.py on two configs, shortened (3 epochs of a tiny U-Net on the `tiny` preset): a table with each one's
    steps, final error and time to the target, and the figure; its checkpoints deleted; run again, it trains
    nothing and redraws."""
    study = tmp_path / "study"
    arguments = ["--preset", "tiny", "--configs", "bs64", "bs256", "--out_dir", study, "--num_epochs", "3",
                 "--base_channels", "4", "--depth", "2", "--data_root", tiny_data]  # fmt: skip
    result = run_python(STAGE / "study.py", *arguments, cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    table = (study / "study.txt").read_text()
    rows = {line.split()[0]: line for line in table.splitlines()[3:]}
    assert sorted(rows) == ["bs256", "bs64"], table
    assert rows["bs64"].split()[3] == "24" and rows["bs256"].split()[3] == "6", "steps: 3 epochs of 8 and 2"
    assert "not reached" not in rows["bs64"], "the first config reaches its own final error plus 10 %"
    assert (study / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(study.glob("*/checkpoints")), "the study keeps curves, not weights"
    again = run_python(STAGE / "study.py", *arguments, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("finished already") == 2, output_of(again)
