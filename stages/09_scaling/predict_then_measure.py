"""Predict, then measure: does scaling_model.py predict the step of 2 processes on this machine?

For each repeat, and each case in turn (interleaved, so that a machine getting busier shifts both alike):
  1. profile one process at the per-process batch (train.py --profile_steps);
  2. measure the all-reduce on 2 processes (bench_allreduce.py);
  3. write both, and the prediction made from them alone, to inputs-<case>-<repeat>.json;
  4. only then profile 2 processes, which nothing was fitted to.
Then print predicted and measured side by side, term by term: median and range over the repeats.

    python stages/09_scaling/predict_then_measure.py                                   # 5 repeats, about 6 min
    python stages/09_scaling/predict_then_measure.py --repeats 1 --cases compute       # the smallest form

Two cases: `compute`, the quick config (batch 32, 66 k parameters: compute dominates), and `communication`, a wide
model (64 channels: 1.9 M parameters, as many as `default`) on a batch of 2, one sample per process. Every process
has one thread and one DataLoader worker. On a laptop this is gloo over loopback between processes sharing the
same cores: it checks the model's arithmetic and its overlap rule, not a network.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # find `common` from any working directory
import common
import scaling_model

CASES = {  # the settings of each case; global batch 2 x the per-process batch of the 1-process profile
    "compute": {"global_batch": 32, "arguments": ["--config", "quick"]},
    "communication": {"global_batch": 2, "arguments": ["--config", "quick", "--base_channels", "64"]},
}
SAME_FOR_ALL = ["--num_epochs", "1", "--profile_steps", "6-10", "--num_workers", "1", "--log_every", "1000",
                "--checkpoint_every", "1000", "--wandb_mode", "disabled", "--resume", "none"]
SIZES = "4KB,64KB,1MB,4MB,16MB"  # around the gradients of both cases (0.3 and 7.5 MB)
PARTS = ["data_wait", "forward", "backward", "allreduce_exposed", "optimizer", "other"]
TERMS = [*PARTS, "step", "allreduce_whole"]  # the parts add up to the step; the whole all-reduce, hidden or not


def run(command, log_file):
    """Run a command with one thread per process; its output goes to log_file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log_file, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise common.UserError(f"{' '.join(map(str, command))} failed (exit code {code}): see {log_file}")


def torchrun(script, *arguments):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *arguments]


def one_repeat(case, repeat, folder, data_preset):
    """The 1-process profile and the all-reduce, the prediction written, then the 2-process profile."""
    settings, name = CASES[case], f"{case}-{repeat}"
    arguments = [*settings["arguments"], *SAME_FOR_ALL, "--data_preset", data_preset]
    one = folder / f"{name}-1proc"
    run([sys.executable, HERE / "train.py", *arguments, "--global_batch_size", str(settings["global_batch"] // 2),
         "--out_dir", one], folder / f"{name}-1proc.log")  # fmt: skip
    bench = folder / f"{name}-allreduce.json"
    run(torchrun(HERE / "bench_allreduce.py", "--sizes", SIZES, "--out", bench), folder / f"{name}-allreduce.log")
    profile, benchmark = read_json(one / "profile" / "breakdown.json"), read_json(bench)
    links = scaling_model.links_from_benchmark(benchmark)
    predicted = scaling_model.predict_step(profile, links, world_size=2, nodes=1,
                                           per_process_batch=settings["global_batch"] // 2)  # fmt: skip
    inputs = {"profile_1proc": profile, "allreduce": benchmark, "links": links, "predicted": predicted}
    (folder / f"inputs-{name}.json").write_text(json.dumps(inputs, indent=1) + "\n")  # before the 2-process run
    two = folder / f"{name}-2proc"
    run(torchrun(HERE / "train.py", *arguments, "--global_batch_size", str(settings["global_batch"]), "--out_dir",
                 two), folder / f"{name}-2proc.log")  # fmt: skip
    return predicted, read_json(two / "profile" / "breakdown.json")


def read_json(path):
    if not Path(path).exists():
        raise common.UserError(f"{path} was not written: see the .log files beside it")
    return json.loads(Path(path).read_text())


def as_terms(figures):
    """The terms of a prediction or a profile, in seconds: its parts, its step and its whole all-reduce."""
    parts = figures.get("parts_s", figures)
    return {**{part: parts[part] for part in PARTS}, "step": figures["step_s"],
            "allreduce_whole": figures["allreduce_whole_s"]}  # fmt: skip


def table(case, predicted, measured):
    """Median [min-max] over the repeats, in milliseconds, and the measured median's difference from the predicted."""
    lines = [f"{case}: {len(measured)} repeat(s), ms per step (median [min-max])",
             f"  {'term':<18} {'predicted':>24} {'measured, 2 processes':>24} {'difference':>12}"]  # fmt: skip
    for term in TERMS:
        p = [as_terms(figures)[term] * 1e3 for figures in predicted]
        m = [as_terms(figures)[term] * 1e3 for figures in measured]
        difference = statistics.median(m) - statistics.median(p)
        lines.append(f"  {term:<18} {spread(p):>24} {spread(m):>24} {difference:>+12.2f}")
    return "\n".join(lines)


def spread(values):
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every case (default 5)")
    parser.add_argument("--cases", default="compute,communication", help="which of: " + ", ".join(CASES))
    parser.add_argument("--data_preset", default="tiny", help="the data of every run (default tiny)")
    parser.add_argument("--out_dir", type=Path, default=None, help="default: runs/09_scaling/check-<date-time>")
    args = parser.parse_args()
    cases = args.cases.split(",")
    if any(case not in CASES for case in cases) or args.repeats < 1:
        raise common.UserError(f"--cases takes some of {', '.join(CASES)} and --repeats 1 or more")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = args.out_dir or common.output_root("runs", default=HERE.parents[1] / "runs") / HERE.name / f"check-{stamp}"
    if (folder / "check.json").exists():
        raise common.UserError(f"{folder} holds a check already: give another --out_dir (nothing was overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    results = {case: {"predicted": [], "measured": []} for case in cases}
    for repeat in range(1, args.repeats + 1):
        for case in cases:
            predicted, measured = one_repeat(case, repeat, folder, args.data_preset)
            results[case]["predicted"].append(predicted)
            results[case]["measured"].append(measured)
            print(f"{time.strftime('%H:%M:%S')} {case} repeat {repeat}: step predicted "
                  f"{1e3 * predicted['step_s']:.2f} ms, measured {1e3 * measured['step_s']:.2f} ms", flush=True)
    report = "\n\n".join(table(case, **results[case]) for case in cases)
    report = f"On {measured['hardware']}, gloo over loopback, one thread per process:\n\n{report}"
    print(f"\n{report}")
    (folder / "check.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "check.txt").write_text(report + "\n")
    print(f"\nevery input, prediction and run: {folder}")


if __name__ == "__main__":
    common.run_main(main)
