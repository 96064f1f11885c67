"""GPU truth: measure the stages on one GPU, side by side, within a time budget, and write one table.

    python stages/gpu_truth.py --budget_s 750    # on one GPU: every part (716 s on an H200, in two commands)
    python stages/gpu_truth.py                   # --budget_s 300: the throughput runs once, and the model alone
    python stages/gpu_truth.py --size test       # its smallest form, on a CPU: about a minute (the tests run it)

It generates its data first (the `bench` preset: `full`'s 128x128 grid and batch of 128, an eighth of its samples,
so that generation takes seconds), then runs these parts in this order while the budget lasts; a run it cannot
start in time says "not run", and a stage that does not exist says "not run: stage absent":
1. throughput: stages 02, 04, 05 (bf16), 05 (bf16 + compile) and 06 (one process under torchrun), 320 steps each,
   in one sequence: samples/s, data wait, peak GPU memory and first-step time of each;
2. the model alone: stage 05's own step on batches already on the GPU, at the same batch and precision: the limit;
3. the sequence of 1 again: the spread of two runs;
4. the newest stage against a Lightning Trainer on the same model, Dataset, loader, batch and precision, where
   `lightning` is installed (it is not a dependency of this tutorial);
5. --deterministic true on stage 04, against its runs of 1 and 3;
6. the newest stage's profile of the step (the compute side of stage 09's scaling model);
7. stage 07's `bs512` with micro-batches of 256 (two per step) and without (one): what accumulation costs;
8. the CUDA resume tests of the checkpointing stages (`pytest -k cuda`).
It writes <out_dir>/truth.json and table.md, each naming the GPU, driver, torch and the commit it measured.
Figures from an H100 or H200 do not carry over to Perlmutter's A100s: measure there with the same command.
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import run_all

REPO = Path(__file__).resolve().parents[1]
BENCH = ["--data_preset", "bench", "--num_epochs", "5", "--log_every", "64"]  # 5 epochs of 64 steps: 320 steps
SIZES = {
    "gpu": {
        "config": "full",
        "throughput": [("02", "02", BENCH), ("04", "04", BENCH), ("05 bf16", "05", [*BENCH, "--precision", "bf16"]),
                       ("05 bf16 + compile", "05", [*BENCH, "--precision", "bf16", "--compile", "true"]),
                       ("06 bf16, 1 process", "06", [*BENCH, "--precision", "bf16"])],  # fmt: skip
        "model_alone": [["--precision", "bf16"], ["--precision", "bf16", "--compile", "true"]],
        "model_alone_steps": (20, 150),  # warm-up steps (compiling), then steps timed, twice
        "accumulation": ("bs512", [["--micro_batch_size", "256"], ["--micro_batch_size", "0"]]),
        "deterministic": ("04", BENCH),  # against the throughput runs of stage 04
        "profile_steps": "21-25",
        "newest": [*BENCH, "--precision", "bf16"],
        "least_s": 30,  # a run is started only with this much of the budget left (on the H200: 22 to 75 s a run)
    },
    "test": {  # the machinery on a CPU, in the `test` configs: 16 steps a run
        "config": "test",
        "throughput": [("02", "02", ["--num_epochs", "1"]), ("04", "04", ["--num_epochs", "1"]),
                       ("06, 1 process", "06", ["--num_epochs", "1"])],  # fmt: skip
        "model_alone": [[]],
        "model_alone_steps": (2, 5),
        "accumulation": ("test", [["--micro_batch_size", "16"], ["--micro_batch_size", "0"]]),
        "deterministic": ("04", ["--num_epochs", "1"]),
        "profile_steps": "5-8",
        "newest": ["--num_epochs", "1"],
        "least_s": 5,
    },
}
NEWEST_LABEL = "the newest stage, 1 process"
CUDA_TESTS_LIMIT_S = 120  # 21 short runs on 4 workers: about a minute expected
RUN_LIMIT_S = 180  # one run that takes longer hangs: end it, and go on with the next
RESULTS_FILE = None  # <out_dir>/results.jsonl, set by main()
PARTS = ("throughput", "model_alone", "accumulation", "deterministic", "cuda_tests", "profile", "lightning")


def commit(given):
    """The commit measured, and whether files differ from it (then the figures are not that commit's alone).
    --commit names it for a copy of the working tree whose .git is missing or not its own (a lent GPU machine's
    copy: git there named the commit this checkout was at when the session began, not the one sent)."""
    if given:
        return given, None  # None: not known whether the files differ from it
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True)  # fmt: skip
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def machine():
    """What ran: the GPU (or CPU), its driver, torch and CUDA, the CPUs."""
    device = common.choose_device("auto")
    driver = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        answer = subprocess.run(query, capture_output=True, text=True)
        driver = answer.stdout.split()[0] if answer.returncode == 0 and answer.stdout.strip() else None
    return {"hardware": common.hardware(device), "device": device.type, "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "python": sys.version.split()[0]}  # fmt: skip


def gpu_tag(hardware):
    """A short name for the output folder, as the example logs' are named: h100, h200, a100, or cpu."""
    for model in ("GH200", "H200", "H100", "A100", "L40S", "V100"):
        if model in hardware:
            return model.lower()
    return "cpu" if hardware.startswith("CPU") else "".join(c for c in hardware.lower() if c.isalnum())[-12:]


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def run_command(command, output, timeout_s):
    """Run a command, its output to a file. Past timeout_s (or on Ctrl-C), end it and every process under it
    (torchrun, its ranks, their DataLoader workers). The exit code, or None if it ran out of time."""
    with open(output, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            return process.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            return None
        finally:
            if process.poll() is None:
                end_process_tree(process.pid)
                process.wait()


def end_process_tree(pid):
    """SIGKILL a process and every process under it, the deepest first: torchrun starts each rank in a session of
    its own, so killing torchrun's process group would leave the ranks running on the GPU."""
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        end_process_tree(int(child))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def record(results, part, label, status, seconds=0.0, **figures):
    """Add a run's result, and write it at once to results.jsonl: what ran before a crash is kept."""
    entry = {"part": part, "label": label, "status": status, "seconds": round(seconds, 1), **figures}
    results.append(entry)
    if RESULTS_FILE:
        with open(RESULTS_FILE, "a") as file:
            file.write(json.dumps(entry) + "\n")
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                      if v is not None and not isinstance(v, dict))  # fmt: skip
    print(f"[{part}] {label}: {status} in {seconds:.0f} s{'; ' + shown if shown else ''}", flush=True)
    return entry


def stage_for(prefix):
    stages = run_all.stage_dirs([prefix])
    return stages[0] if len(stages) == 1 else None


def newest_stage():
    return run_all.stage_dirs([])[-1]


def run_stage(results, part, label, prefix, config, settings, args, budget):
    """One run of a stage's train.py (under torchrun with one process from stage 06 on); its summary's figures."""
    stage = stage_for(prefix)
    if stage is None:
        return record(results, part, label, "not run: stage absent")
    if budget.left() < args.least_s:
        return record(results, part, label, f"not run: {budget.left():.0f} s of the budget left")
    if "wandb_mode" in (stage / "config.yaml").read_text():
        settings = [*settings, "--wandb_mode", "disabled"]  # W&B is not what is measured
    name = f"{len(results):02d}-" + "".join(c if c.isalnum() else "_" for c in label).strip("_")
    out_dir = args.out_dir / "logs" / name
    command = run_all.script_command(stage, config, out_dir, [*settings, "--data_root", str(args.data_root)], 1)
    start = time.monotonic()
    code = run_command(command, args.out_dir / "logs" / f"{name}.out", min(budget.left(), RUN_LIMIT_S))
    seconds = time.monotonic() - start
    if code is None:
        return record(results, part, label, "stopped: out of time (budget or run limit)", seconds, run=name)
    if code != 0:
        return record(results, part, label, f"failed (exit code {code}): see logs/{name}.out", seconds, run=name)
    s = common.read_summary(out_dir)
    figures = {"samples_per_s": s["samples_per_s"], "data_wait_share": s["data_wait_share"],
               "first_step_s": s["first_step_s"], "peak_gpu_memory_gib": s.get("peak_gpu_memory_gib"),
               "steps": s["steps"], "val_relative_l2": s["val_relative_l2"]}  # fmt: skip
    return record(results, part, label, "ok", seconds, run=name, **figures)


def run_helper(results, part, label, mode, settings, args, budget):
    """This script in another process (the model alone, Lightning): it prints its figures as one JSON line."""
    if budget.left() < args.least_s:
        return record(results, part, label, f"not run: {budget.left():.0f} s of the budget left")
    name = f"{len(results):02d}-{part}"
    output = args.out_dir / "logs" / f"{name}.out"
    command = [sys.executable, __file__, "--helper", mode, "--size", args.size, "--data_root", str(args.data_root),
               "--", *settings]  # fmt: skip
    start = time.monotonic()
    code = run_command(command, output, min(budget.left(), RUN_LIMIT_S))
    seconds = time.monotonic() - start
    lines = [line for line in output.read_text().splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        status = "stopped: out of time" if code is None else f"failed (exit code {code}): see logs/{name}.out"
        return record(results, part, label, status, seconds)
    return record(results, part, label, "ok", seconds, **json.loads(lines[-1]))


def load_stage_module(stage, name):
    """A stage's own module (its train.py, data_loading.py) as the stage imports it, its folder first on the path."""
    sys.path.insert(0, str(stage))
    spec = importlib.util.spec_from_file_location(f"{stage.name}_{name}", stage / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_alone(size, data_root, settings):
    """Stage 05's own step (its model, fused AdamW, autocast, compile) on batches already on the device: no loader,
    no copies, no logging. Random batches (never zeros: they can run faster), four of them in turn."""
    stage = stage_for("05")
    train = load_stage_module(stage, "train")
    cfg = common.load_config(stage / "config.yaml", ["--config", SIZES[size]["config"], *settings])
    device = common.choose_device(cfg.device)
    dtype = train.speedups.choose_precision(cfg, device)
    state = train.build_training_state(cfg, device, 1000, dtype)
    state.step_model = torch.compile(state.model) if cfg.compile else state.model
    grid = common.PRESETS[cfg.data_preset]["grid"]
    batches = [torch.randn(2, cfg.batch_size, 1, grid, grid, device=device) for _ in range(4)]
    warmup, steps = SIZES[size]["model_alone_steps"]
    first = time.perf_counter()
    for i in range(warmup):
        train.train_step(state, *batches[i % 4], dtype).item()
    first_s = time.perf_counter() - first
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for i in range(steps):
            loss = train.train_step(state, *batches[i % 4], dtype)
        loss.item()  # waits for the GPU
        rates.append(steps * cfg.batch_size / (time.perf_counter() - start))
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"samples_per_s": statistics.mean(rates), "repeats": rates, "warmup_s": first_s,
            "peak_gpu_memory_gib": memory, "precision": cfg.precision, "compile": cfg.compile}  # fmt: skip


def lightning_run(size, data_root, settings):
    """The newest stage's model, Dataset and loaders in a Lightning Trainer: the same batch, precision, compile
    setting and number of steps. samples/s over the steps after the first, as the stages count them."""
    import lightning

    stage = newest_stage()
    data_loading = load_stage_module(stage, "data_loading")
    cfg = common.load_config(stage / "config.yaml", ["--config", SIZES[size]["config"], *settings])
    device = common.choose_device(cfg.device)
    data_dir = common.ensure_data(cfg.data_preset, data_root, cfg.seed)
    _, _, train_loader, _ = data_loading.make_loaders(cfg, data_dir, device, cfg.global_batch_size)
    steps = cfg.num_epochs * len(train_loader)
    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(cfg.precision, "32-true")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = common.UNet(cfg.base_channels, cfg.depth)

        def training_step(self, batch, index):
            delta, phi = batch
            return torch.nn.functional.mse_loss(self.model(delta).float(), phi)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.base_lr, fused=device.type == "cuda")
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class Clock(lightning.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, index):
            if trainer.global_step == 1:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

    clock = Clock()
    module = Module()
    model = torch.compile(module) if cfg.compile else module
    trainer = lightning.Trainer(accelerator=device.type, devices=1, precision=precision, max_steps=steps,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                                use_distributed_sampler=False, callbacks=[clock])  # fmt: skip
    trainer.fit(model, train_loader)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"samples_per_s": (trainer.global_step - 1) * cfg.global_batch_size / seconds, "steps": trainer.global_step,
            "peak_gpu_memory_gib": memory, "precision": precision, "lightning": lightning.__version__}  # fmt: skip


def cuda_tests(results, args, budget):
    """The checkpointing stages' CUDA resume tests, bit-exact with --deterministic true. The project's pytest
    options need nbmake, which a GPU machine may lack: -o addopts= drops them."""
    if not torch.cuda.is_available():
        return record(results, "cuda_tests", "pytest -k cuda", "not run: no CUDA GPU")
    if budget.left() < args.least_s:
        return record(results, "cuda_tests", "pytest -k cuda", f"not run: {budget.left():.0f} s of the budget left")
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-k", "cuda",
               "tests/test_checkpoint.py"]  # fmt: skip
    if importlib.util.find_spec("xdist"):
        command += ["-n", "4"]
    output = args.out_dir / "logs" / "cuda_tests.out"
    start = time.monotonic()
    code = run_command(command, output, min(budget.left(), CUDA_TESTS_LIMIT_S))
    lines = output.read_text().strip().splitlines()
    status = "stopped: out of time" if code is None else "ok" if code == 0 else f"failed (exit code {code})"
    return record(results, "cuda_tests", "pytest -k cuda", status, time.monotonic() - start,
                  result=lines[-1] if lines else "")  # fmt: skip


def profile(results, args, budget, size):
    stage = newest_stage()
    if "profile_steps" not in (stage / "config.yaml").read_text():
        return record(results, "profile", "profile of the step", "not run: stage absent (stage 09 profiles)")
    settings = [*size["newest"], "--num_epochs", "1", "--profile_steps", size["profile_steps"]]
    entry = run_stage(results, "profile", f"{stage.name[:2]} --profile_steps {size['profile_steps']}", stage.name[:2],
                      size["config"], settings, args, budget)  # fmt: skip
    breakdown = args.out_dir / "logs" / entry.get("run", "-") / "profile" / "breakdown.json"
    if entry["status"] == "ok" and breakdown.exists():
        entry["breakdown"] = json.loads(breakdown.read_text())
    return entry


def measure(args, results):
    size = SIZES[args.size]
    budget = Budget(args.budget_s)
    (args.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    parts = args.parts
    for preset in ("bench", "small") if args.size == "gpu" else ("micro",):
        start = time.monotonic()
        common.ensure_data(preset, args.data_root)
        record(results, "data", f"preset {preset}", "ok", time.monotonic() - start)
    for repeat in (1, 2)[: args.repeats]:
        if "throughput" in parts:
            for label, prefix, settings in size["throughput"]:
                run_stage(results, "throughput", label, prefix, size["config"], settings, args, budget)
        if "model_alone" in parts and repeat == 1:
            for settings in size["model_alone"]:
                run_helper(results, "model_alone", " ".join(["model alone", *settings]) or "model alone",
                           "model_alone", settings, args, budget)  # fmt: skip
    newest = newest_stage().name[:2]
    if "lightning" in parts:
        run_stage(results, "lightning", NEWEST_LABEL, newest, size["config"], size["newest"], args,
                  budget)  # fmt: skip
        if importlib.util.find_spec("lightning"):
            run_helper(results, "lightning", "Lightning Trainer", "lightning", size["newest"], args, budget)
        else:
            record(results, "lightning", "Lightning Trainer", "not run: lightning is not installed here")
    if "deterministic" in parts:
        prefix, settings = size["deterministic"]
        run_stage(results, "deterministic", f"{prefix} --deterministic true", prefix, size["config"],
                  [*settings, "--deterministic", "true"], args, budget)  # fmt: skip
    if "profile" in parts:
        profile(results, args, budget, size)
    if "accumulation" in parts:
        config, variants = size["accumulation"]
        for settings in variants:
            run_stage(results, "accumulation", " ".join(["07 --config", config, *settings]), "07", config, settings,
                      args, budget)  # fmt: skip
    if "cuda_tests" in parts:  # last: they time nothing (on the H200 they took 65 s)
        cuda_tests(results, args, budget)


def rates(results, part, label):
    return [r["samples_per_s"] for r in results if r["part"] == part and r["label"] == label and r["status"] == "ok"]


def mean_rate(results, part, label):
    found = rates(results, part, label)
    return statistics.mean(found) if found else None


def spread(values):
    return (max(values) - min(values)) / statistics.mean(values) if len(values) > 1 else None


def target(name, met, figure):
    """One of the issue's targets: met, not met, or not measured (figure None: a run it needs is missing)."""
    status = "not measured" if figure is None else "met" if met else "not met"
    return {"target": name, "status": status, "figure": figure}


def targets(results):
    """The targets for one H100/H200, each with its figure. A target not met is a finding, not a failure."""
    s02, s05 = mean_rate(results, "throughput", "02"), mean_rate(results, "throughput", "05 bf16")
    s05c = mean_rate(results, "throughput", "05 bf16 + compile")
    s06 = mean_rate(results, "throughput", "06 bf16, 1 process")
    alone = mean_rate(results, "model_alone", "model alone --precision bf16 --compile true")
    newest = mean_rate(results, "lightning", NEWEST_LABEL)
    lightning = mean_rate(results, "lightning", "Lightning Trainer")
    fast, exact = mean_rate(results, "throughput", "04"), mean_rate(results, "deterministic", "04 --deterministic true")
    ran_04 = [r for r in results if (r["part"], r["label"], r["status"]) == ("throughput", "04", "ok")]
    waits = [r["data_wait_share"] for r in ran_04]
    noise = max(spread(rates(results, "throughput", label)) or 0 for label in ("05 bf16", "06 bf16, 1 process"))
    wait_figure = " / ".join(f"{w:.1%}" for w in waits) or None

    def ratio(a, b):
        return f"{a / b:.2f}x ({a:.0f} / {b:.0f} samples/s)" if a and b else None

    return [
        target("stage 04 data wait under 3 %", waits and max(waits) < 0.03, wait_figure),
        target("stage 05 (bf16 + compile) at least 3x stage 02", s05c and s02 and s05c >= 3 * s02, ratio(s05c, s02)),
        target("stage 05 (bf16 + compile) at least 0.9x the model alone", s05c and alone and s05c >= 0.9 * alone,
               ratio(s05c, alone)),
        target("stage 06 (one process) at most 3 % slower than stage 05 (bf16), beyond the spread of the repeats",
               s06 and s05 and s06 >= s05 * (1 - 0.03 - noise),
               ratio(s06, s05) and f"{ratio(s06, s05)}, spread of the repeats {noise:.1%}"),
        target("the newest stage at least 1.0x Lightning", newest and lightning and newest >= lightning,
               ratio(newest, lightning)),
        target("the cost of --deterministic true stated", True, ratio(exact, fast)),
    ]


def grouped(truth):
    """{(part, label): [its runs]}, in the order they ran; the data generation left out."""
    seen = {}
    for r in truth["runs"]:
        if r["part"] != "data":
            seen.setdefault((r["part"], r["label"]), []).append(r)
    return seen


def row(part, label, runs):
    ok = [r for r in runs if r["status"] == "ok" and "samples_per_s" in r]
    each = [r["samples_per_s"] for r in ok]
    waits = [r["data_wait_share"] for r in ok if r.get("data_wait_share") is not None]
    firsts = [r.get("first_step_s", r.get("warmup_s")) for r in ok if r.get("first_step_s", r.get("warmup_s"))]
    memory = [r["peak_gpu_memory_gib"] for r in ok if r.get("peak_gpu_memory_gib")]
    status = "; ".join(sorted({r["result"] if part == "cuda_tests" and r["status"] == "ok" else r["status"]
                               for r in runs}))  # fmt: skip
    cells = [part, f"`{label}`", " / ".join(f"{x:.0f}" for x in each) or "-",
             f"{spread(each):.1%}" if spread(each) is not None else "-",
             " / ".join(f"{w:.1%}" for w in waits) or "-", " / ".join(f"{f:.1f} s" for f in firsts) or "-",
             f"{max(memory):.2f} GiB" if memory else "-", status]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def heading(truth):
    commit_said = (truth["commit"] or "unknown")[:7] + (" with uncommitted changes" if truth["dirty"] else "")
    return (f"{truth['hardware']}, driver {truth['driver'] or '-'}, torch {truth['torch']} (CUDA {truth['cuda'] or '-'}"
            f"), {truth['cpus']} CPUs; commit {commit_said}; {truth['date']}; --size {truth['size']}, "
            f"{truth['seconds']:.0f} s of a {truth['budget_s']:.0f} s budget")  # fmt: skip


def profile_lines(truth):
    lines = []
    for r in truth["runs"]:
        if "breakdown" in r:
            b = r["breakdown"]
            parts = ", ".join(f"{name.replace('_', ' ')} {seconds * 1e3:.1f} ms"
                              for name, seconds in b["parts_s"].items())  # fmt: skip
            lines.append(f"Profile of the step (`{r['label']}`, {b['world_size']} process): {b['step_s'] * 1e3:.1f} "
                         f"ms per step of {b['per_process_batch']} samples: {parts}.")  # fmt: skip
    return lines


def table(truth, labels=None):
    """The results as markdown: one row per run label (those of `labels` only, if given), the repeats side by side;
    with every row, the profile and the targets too."""
    lines = ["| part | run | samples/s (each run) | spread | data wait | first step | peak GPU memory | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    found = grouped(truth)
    chosen = [key for key in found if labels is None or key[1] in labels]
    missing = set(labels or ()) - {label for _, label in found}
    if missing:
        raise common.UserError(f"no run labelled {', '.join(sorted(missing))} in this measurement")
    lines += [row(part, label, found[(part, label)]) for part, label in chosen]
    if labels is not None:
        return "\n".join(lines) + "\n"
    return "\n".join([heading(truth), "", *lines, "", *profile_lines(truth), "", *target_lines(truth)]) + "\n"


def target_lines(truth):
    return [f"- {t['target']}: **{t['status']}**" + (f", {t['figure']}" if t["figure"] else "")
            for t in truth["targets"]]  # fmt: skip


def merge(files):
    """One measurement made by several commands on the same machine and commit (parts the budget left out, run
    next): their runs in order, less a "not run" of a part that a later command ran; the targets over all of them."""
    truths = [json.loads(Path(file).read_text()) for file in files]
    for key in ("hardware", "driver", "torch", "commit", "size"):
        if len({str(t[key]) for t in truths}) > 1:
            values = ", ".join(str(t[key]) for t in truths)
            raise common.UserError(f"--merge: the measurements differ in {key} ({values}): merge only measurements of "
                                   "one machine and commit")  # fmt: skip
    merged = {**truths[0], "date": " and ".join(t["date"] for t in truths)}
    merged |= {"seconds": sum(t["seconds"] for t in truths), "budget_s": sum(t["budget_s"] for t in truths)}
    runs = [r for t in truths for r in t["runs"]]
    ran = {(r["part"], r["label"]) for r in runs if not r["status"].startswith("not run")}
    merged["runs"] = [r for r in runs if (r["part"], r["label"]) not in ran or not r["status"].startswith("not run")]
    merged["targets"] = targets(merged["runs"])
    return merged


README_START = re.compile(r"<!-- gpu_truth rows: (.*?) -->\n")
README_END = "<!-- end gpu_truth -->"


def readme_blocks(text, truth, folder, readme):
    """The README's text with each gpu_truth block written again from the measurement in `folder`: a line naming
    the hardware, commit and logs, then the rows the block's first line names ("all": every row, and the targets)."""
    out, position = [], 0
    for start in README_START.finditer(text):
        end = text.index(README_END, start.end())
        names = start.group(1)
        labels = list(dict.fromkeys(label for _, label in grouped(truth))) if names == "all" else [
            label.strip() for label in names.split("|")]  # fmt: skip
        logs = os.path.relpath(folder, readme.parent)
        head = (f"Measured on one {truth['hardware']} (driver {truth['driver']}, torch {truth['torch']}, "
                f"{truth['cpus']} CPUs) at commit {(truth['commit'] or 'unknown')[:7]}, {truth['date']}, by "
                f"`python stages/gpu_truth.py` ([its logs]({logs}/COMMAND)); the `bench` preset (128x128, batch 128) "
                f"unless a row names another config, 320 steps a run (the profile: 64). H100 and H200 figures do not "
                f"carry over to Perlmutter's A100s: measure there.\n\n")
        goals = "\n" + "\n".join(target_lines(truth)) + "\n" if names == "all" else ""
        out += [text[position : start.end()], head, table(truth, labels), goals]
        position = end
    return "".join(out + [text[position:]])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--budget_s", type=float, default=300, help="wall time for all of it (default: 300)")
    parser.add_argument("--size", choices=SIZES, default="gpu", help="gpu (default) | test: its smallest form")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="default: all")
    parser.add_argument("--repeats", type=int, choices=(1, 2), default=2, help="runs of each throughput stage")
    parser.add_argument("--out_dir", type=Path, help="default: runs/gpu_truth/<size>-<gpu> (or under $SCRATCH)")
    parser.add_argument("--data_root", type=Path, help="default: <out_dir>/data")
    parser.add_argument("--commit", help="the commit measured, for a copy without .git (default: git's HEAD)")
    parser.add_argument("--merge", nargs="+", metavar="TRUTH_JSON", help="merge measurements into --out_dir")
    parser.add_argument("--readmes", type=Path, metavar="FOLDER",
                        help="write the README tables from FOLDER/truth.json (e.g. example_logs/gpu_truth-bench-h200)")
    parser.add_argument("--helper", choices=("model_alone", "lightning"), help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    settings = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.merge:
        if not args.out_dir:
            raise common.UserError("--merge writes the merged measurement to --out_dir: give one")
        truth = merge(args.merge)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        (args.out_dir / "table.md").write_text(table(truth))
        print(table(truth))
        return
    if args.readmes:
        truth = json.loads((args.readmes / "truth.json").read_text())
        for readme in [REPO / "README.md", *sorted(REPO.glob("stages/*/README.md"))]:
            text = readme.read_text()
            written = readme_blocks(text, truth, args.readmes, readme)
            if written != text:
                readme.write_text(written)
                print(f"wrote {readme.relative_to(REPO)}")
        return
    if args.helper:  # one part in a process of its own, as a stage runs
        helper = model_alone if args.helper == "model_alone" else lightning_run
        print(json.dumps(helper(args.size, args.data_root, settings)), flush=True)
        return
    if args.budget_s <= 0:
        raise common.UserError(f"--budget_s {args.budget_s:g}: give the seconds it may take, e.g. 300")
    hardware = machine()
    args.out_dir = Path(args.out_dir or common.run_dir("gpu_truth", f"{args.size}-{gpu_tag(hardware['hardware'])}"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if (args.out_dir / "truth.json").exists() or (args.out_dir / "logs").exists():
        raise common.UserError(f"{args.out_dir} holds an earlier measurement (truth.json, logs/): give another "
                               "--out_dir, or move that one away")  # fmt: skip
    args.data_root = args.data_root or args.out_dir / "data"
    args.least_s = SIZES[args.size]["least_s"]
    global RESULTS_FILE
    RESULTS_FILE = args.out_dir / "results.jsonl"
    head, dirty = commit(args.commit)
    truth = {**hardware, "commit": head, "dirty": dirty, "size": args.size, "budget_s": args.budget_s,
             "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    print(f"measuring on {truth['hardware']} (commit {(head or 'unknown')[:7]}), budget {args.budget_s:.0f} s",
          flush=True)  # fmt: skip
    start = time.monotonic()
    truth["runs"] = []
    try:
        measure(args, truth["runs"])
    except Exception as error:  # a fault of this script: the table of what ran is still written, the error named
        record(truth["runs"], "error", "gpu_truth.py", f"failed: {error!r}")
        traceback.print_exc()
    truth["seconds"] = time.monotonic() - start
    truth["targets"] = targets(truth["runs"])
    (args.out_dir / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    text = table(truth)
    (args.out_dir / "table.md").write_text(text)
    print(f"\n{text}\nwritten: {args.out_dir / 'truth.json'} and table.md")
    if any(r["part"] == "error" for r in truth["runs"]):
        sys.exit("error: gpu_truth.py itself failed (above); the table holds what ran before")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
