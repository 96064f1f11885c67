"""Break the code on purpose, one small plausible breakage at a time, in a scratch copy of the repository, and run
the tests that must catch it: does each test still guard what the READMEs say it does? A maintainer's check, run on
demand (not by `pytest`); all of it takes about 25 minutes on 2 cores.

    python tests/breakages.py                        # every breakage, then the table
    python tests/breakages.py rng-not-restored ...   # only these
    python tests/breakages.py --list
    python tests/breakages.py --show ...           # what the tests printed, for caught ones too

Each breakage replaces a piece of text that occurs exactly once in one file, then runs its tests (`pytest -x`),
then puts the file back. The report says, for each:
  caught             its tests failed, and the failure shows the text `expect` (the right reason);
  NOT caught         its tests passed: the guarantee can break unnoticed;
  caught elsewhere   its tests failed, but not for the expected reason;
  no longer applies  the text is gone (the code was rewritten): write the breakage again for the new code.
The exit code is 0 only if every breakage asked for was caught.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Breakage(NamedTuple):
    name: str
    file: str  # relative to the repository
    old: str  # the text it replaces (exactly once in the file)
    new: str
    tests: list  # pytest node ids, relative to the repository
    expect: str  # a piece of the failure output that shows the right reason


S03, S04, S05 = "stages/03_checkpoint_restart", "stages/04_data_loading", "stages/05_amp"
S06, S07, S08 = "stages/06_ddp", "stages/07_large_batch", "stages/08_wandb_sweeps"
S09, S10 = "stages/09_scaling", "stages/10_diagnose"  # S10, the newest: the tests of what every stage copies run on
# the first and the newest stage
CHECKPOINT, INSIDE = "tests/test_checkpoint.py", "tests/test_inside_a_run.py"

# fmt: off
BREAKAGES = [
    # Seen only after the first step, or only in what a run from scratch would not also satisfy
    Breakage("rng-not-restored", f"{S03}/train.py", 'checkpoints.set_rng_states(saved["rng"])', "pass",
             [f"{CHECKPOINT}::test_resumed_run_ends_bit_identical[03_checkpoint_restart-mid-epoch]"],
             "torch's generator was not restored"),
    Breakage("rng-not-restored-newest", f"{S10}/train.py", 'checkpoints.set_rng_states(saved["rng"])', "pass",
             [f"{CHECKPOINT}::test_resumed_run_ends_bit_identical[10_diagnose-mid-epoch]"],
             "torch's generator was not restored"),
    Breakage("rerun-after-sigkill-starts-from-scratch", f"{S03}/checkpoints.py", 'folder.glob("step-*.pt"), reverse',
             'folder.glob("step_*.pt"), reverse',
             [f"{CHECKPOINT}::test_sigkill_at_any_moment_then_resume[8-0.02-03_checkpoint_restart]"],
             "no line 'resuming from"),
    Breakage("unreadable-newest-starts-over", f"{S03}/checkpoints.py",
             'previous one")\n            continue', 'previous one")\n            return None, None',
             [f"{CHECKPOINT}::test_corrupt_newest_checkpoint_falls_back_to_the_previous[03_checkpoint_restart]"],
             "no line 'resuming from"),
    Breakage("epoch-0-every-epoch", f"{S04}/train.py", "sampler.set_epoch(epoch, state.batch_in_epoch)",
             "sampler.set_epoch(0, state.batch_in_epoch)",
             [f"{INSIDE}::test_each_epoch_has_an_order_of_its_own[04_data_loading]"], "the loader is told each epoch"),
    Breakage("same-order-every-epoch", f"{S03}/train.py", "manual_seed(cfg.seed * 100_003 + epoch)",
             "manual_seed(cfg.seed * 100_003)",
             [f"{INSIDE}::test_each_epoch_has_an_order_of_its_own[03_checkpoint_restart]"],
             "repeats the first one's order"),
    Breakage("ranks-overlap-from-the-second-batch", f"{S06}/data_loading.py",
             "start = batch * self.batch_size + self.rank * self.local_batch",
             "start = batch * self.local_batch + self.rank * self.local_batch",
             [f"{INSIDE}::test_the_ranks_share_every_batch_and_rank_0_alone_generates_the_data[06_ddp]"],
             "samples twice"),
    Breakage("logged-loss-is-rank-0s-own", f"{S10}/train.py", "loss, wait, stop = agree_across_ranks(loss, timer.wait)",
             "_, wait, stop = agree_across_ranks(loss, timer.wait); loss = loss.item()",
             [f"{INSIDE}::test_two_processes_train_as_one_step_after_step[10_diagnose]"], "assert"),
    Breakage("w-and-b-gets-other-metrics-than-tensorboard", f"{S08}/tracking.py",
             'values = {"trainer/step": step, **metrics}',
             'values = {"trainer/step": step, **{k: v for k, v in metrics.items() if not k.startswith("perf/")}}',
             ["tests/test_wandb.py::test_offline_run_holds_the_metrics_and_only_rank_0_writes"], "perf/"),
    Breakage("summary-after-resume-forgets-the-epochs-loss", f"{S03}/train.py",
             'state.epoch_loss, state.best_val_loss = saved["epoch_loss"], saved["best_val_loss"]',
             'state.epoch_loss, state.best_val_loss = 0.0, saved["best_val_loss"]',
             [f"{CHECKPOINT}::test_resumed_run_ends_bit_identical[03_checkpoint_restart-late]"], "final_train_loss"),
    Breakage("both-ranks-generate-the-data", f"{S06}/distributed.py", "if rank != 0 and not folder.exists():",
             "if rank != 0 and folder.exists():",
             [f"{INSIDE}::test_the_ranks_share_every_batch_and_rank_0_alone_generates_the_data[06_ddp]"],
             "rank 0 generated the missing data"),
    Breakage("compile-never-compiles", f"{S05}/train.py",
             "state.step_model = torch.compile(state.model) if cfg.compile else state.model",
             "state.step_model = state.model",
             ["tests/test_amp.py::test_compile_runs_and_its_checkpoints_load_without_it"], "nothing was compiled"),
    # Our own, of the same kinds
    Breakage("mean-loss-is-a-sum", f"{S06}/distributed.py", "        together /= dist.get_world_size()\n",
             "",
             [f"{INSIDE}::test_two_processes_train_as_one_step_after_step[06_ddp]"], "assert"),
    Breakage("validation-of-rank-0s-share-only", f"{S06}/train.py",
             "loss_sum, error_sum, count = distributed.all_reduce_mean(loss_sum, error_sum, count)",
             "loss_sum, error_sum, count = float(loss_sum), float(error_sum), count",
             [f"{INSIDE}::test_two_processes_train_as_one_step_after_step[06_ddp]"], "final_val_loss"),
    Breakage("resume-ignores-the-batch-in-the-epoch", f"{S05}/train.py",
             "sampler.set_epoch(epoch, state.batch_in_epoch)", "sampler.set_epoch(epoch)",
             [f"{CHECKPOINT}::test_resumed_run_ends_bit_identical[05_amp-mid-epoch]"],
             "tensors differ"),
    Breakage("scheduler-not-restored", f"{S08}/train.py", 'state.scheduler.load_state_dict(saved["scheduler"])', "pass",
             [f"{CHECKPOINT}::test_resumed_run_ends_bit_identical[08_wandb_sweeps-mid-epoch]"], "tensors differ"),
    Breakage("scheduler-not-restored-4-processes-on-slurm", f"{S10}/train.py",
             'state.scheduler.load_state_dict(saved["scheduler"])', "pass",
             ["tests/test_slurm_stages.py::test_time_limit_signal_checkpoints_requeues_and_resumes"], "final_"),
    Breakage("loss-scale-not-restored", f"{S05}/train.py", 'state.scaler.load_state_dict(saved["scaler"])', "pass",
             ["tests/test_amp.py::test_fp16_resume_is_bit_exact_and_keeps_the_loss_scale"], "scaler"),
    Breakage("bf16-never-applied-to-the-step", f"{S05}/train.py",
             "enabled=dtype is not None):  # 16-bit where it is safe", "enabled=False):  # 16-bit where it is safe",
             ["tests/test_amp.py::test_bf16_moves_the_losses_a_little"], "final_train_loss"),
    Breakage("pruning-deletes-the-checkpoint-resumed-from", f"{S03}/checkpoints.py", "if old != path and old != keep:",
             "if old != path:",
             [f"{CHECKPOINT}::test_a_resume_from_an_older_checkpoint_starts_a_branch_and_deletes_nothing"
              "[03_checkpoint_restart]"], "older.exists()"),  # fmt: skip
    Breakage("checkpoint-written-in-place", f"{S03}/checkpoints.py",
             "torch.save(state, tmp)\n        os.replace(tmp, path)", "torch.save(state, path)",
             [f"{CHECKPOINT}::test_full_disk_during_a_checkpoint_loses_nothing[03_checkpoint_restart]"],
             "no temporary file left behind"),
    Breakage("resume-none-deletes-the-earlier-run", f"{S03}/checkpoints.py", "(out_dir / name).rename(archive / name)",
             "shutil.rmtree(out_dir / name, ignore_errors=True)",
             [f"{CHECKPOINT}::test_resume_none_starts_over_and_keeps_the_earlier_run[03_checkpoint_restart]"],
             "checkpoint_files(earlier)"),
    Breakage("accumulated-gradients-not-averaged", f"{S07}/train.py",
             "micro_loss = torch.nn.functional.mse_loss(state.step_model(delta).float(), phi) / accumulation",
             "micro_loss = torch.nn.functional.mse_loss(state.step_model(delta).float(), phi)",
             ["tests/test_large_batch.py::test_accumulated_micro_batches_take_the_step_of_one_large_batch"], "assert"),
    Breakage("sqrt-rule-scales-linearly", f"{S07}/batch_scaling.py", '"sqrt": math.sqrt(k)', '"sqrt": k',
             ["tests/test_large_batch.py::test_the_learning_rate_at_key_steps_is_the_formula"], "sqrt"),
    Breakage("w-and-b-resume-starts-a-new-run", f"{S08}/train.py",
             'continued = None if branch or saved is None else saved["wandb_run_id"]', "continued = None",
             ["tests/test_wandb.py::test_a_run_resumed_offline_is_a_second_piece_of_the_same_run"], "assert"),
    Breakage("mislabelled-data-accepted", "stages/common/data.py", "    if described != expected:",
             "    if False:", [f"{CHECKPOINT}::test_data_of_another_preset_or_other_data_are_refused"
                               "[03_checkpoint_restart]"], "does not hold preset"),  # fmt: skip
    Breakage("profile-other-is-what-is-left", f"{S09}/profiling.py",
             'totals["other"] += union_length([(r.start, r.end) for r in others])',
             'totals["other"] += (end - start) - sum(event.time_range.elapsed_us() for event in ranges)',
             ["tests/test_profile.py::test_the_breakdown_of_a_step_worked_by_hand"], "approx"),
    Breakage("profile-all-reduce-always-hidden", f"{S09}/profiling.py", "    return max(0.0, end - last_compute_end)",
             "    return 0.0", ["tests/test_profile.py::test_the_breakdown_of_a_step_worked_by_hand"], "approx"),
    # Stage 10: the watchdog, the stacks while a rank waits in a collective, the batch shell's USR2 and grace
    Breakage("watchdog-never-warns", f"{S10}/diagnose.py", "        if seconds > (slow_step_limit(recent, timeout_s)",
             "        if False and (slow_step_limit(recent, timeout_s)", ["tests/test_diagnose.py::"
                                  "test_a_stopped_rank_is_reported_before_the_timeout_with_every_ranks_stacks_and_the_run_goes_on"],
             "assert"),
    Breakage("stacks-from-a-python-handler", f"{S10}/diagnose.py",
             "    faulthandler.register(STACK_SIGNAL, file=stacks_file, all_threads=True, chain=False)",
             "    signal.signal(STACK_SIGNAL, lambda *_: faulthandler.dump_traceback(stacks_file))",
             ["tests/test_diagnose.py::"
              "test_a_stopped_rank_is_reported_before_the_timeout_with_every_ranks_stacks_and_the_run_goes_on"],
             "assert"),
    Breakage("batch-shell-ends-on-usr2", f"{S10}/submit_pm.sh",
             """trap 'echo "$(date +%T) USR2: every rank writes its stacks to <out_dir>/stacks/"' USR2""", "",
             ["tests/test_diagnose.py::test_stacks_on_demand_under_srun_with_scancel_full_and_the_job_completes"],
             "assert"),
    Breakage("no-grace-for-a-hung-stop", f"{S10}/submit_pm.sh", "  if kill -0 \"$train_pid\" 2>/dev/null; then\n",
             "  if false; then\n",
             ["tests/test_diagnose.py::test_a_time_limit_signal_while_a_rank_hangs_requeues_within_the_grace_and_resumes"],
             "assert"),
    Breakage("threads-follow-the-machine", "stages/common/run.py", 'os.environ.get("OMP_NUM_THREADS", "1")',
             'os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))',
             ["tests/test_config.py::test_the_cpu_thread_rule_is_fixed_and_follows_only_omp_num_threads"], "assert"),
]
# fmt: on


def scratch_copy(into):
    """The repository's files as git sees them (tracked, and new ones not ignored), copied into `into`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)
    return into


def try_breakage(breakage, copy):
    """(status, seconds, what pytest printed last)."""
    path = copy / breakage.file
    original = path.read_text()
    if original.count(breakage.old) != 1:
        return "no longer applies", 0.0, f"{breakage.old!r} is in {breakage.file} {original.count(breakage.old)} times"
    path.write_text(original.replace(breakage.old, breakage.new))
    workers = ["-n", "0"] if len(breakage.tests) == 1 and "::" in breakage.tests[0] else []
    command = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=short", "-p", "no:cacheprovider", *workers,
               *breakage.tests]  # fmt: skip
    began = time.monotonic()
    try:
        result = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=900)
    finally:
        path.write_text(original)
    seconds, output = time.monotonic() - began, result.stdout + result.stderr
    if result.returncode == 0:
        return "NOT caught", seconds, output
    if result.returncode != 1:  # 2 interrupted, 4 usage error, 5 no tests collected: a test id that no longer exists
        return "test missing", seconds, output
    return ("caught" if breakage.expect in output else "caught elsewhere"), seconds, output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("names", nargs="*", help="the breakages to try (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and their tests, and stop")
    parser.add_argument("--show", action="store_true", help="print what the tests printed for caught ones too")
    args = parser.parse_args(argv)
    known = {breakage.name: breakage for breakage in BREAKAGES}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"no breakage named {', '.join(unknown)}; --list shows them")
    chosen = [known[name] for name in args.names] or BREAKAGES
    if args.list:
        for breakage in chosen:
            print(f"{breakage.name}: {breakage.file} -> {' '.join(breakage.tests)}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="breakages-") as folder:
        copy = scratch_copy(Path(folder))
        for breakage in chosen:
            status, seconds, output = try_breakage(breakage, copy)
            rows.append((breakage, status))
            print(f"{status:18} {seconds:5.0f} s  {breakage.name}", flush=True)
            if status != "caught" or args.show:
                print("    " + "\n    ".join(output.strip().splitlines()[-15:]), flush=True)
    print("\n| breakage | file | test | result |\n|---|---|---|---|")
    for breakage, status in rows:
        print(f"| {breakage.name} | {breakage.file} | {' '.join(breakage.tests)} | {status} |")
    caught = sum(status == "caught" for _, status in rows)
    print(f"\n{caught} of {len(rows)} caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
