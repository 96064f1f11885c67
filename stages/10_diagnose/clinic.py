"""The clinic: break a running distributed training from outside, and see what it looks like and how to find out.

    python stages/10_diagnose/clinic.py stopped-rank           # kill -STOP one rank: the other waits in a collective
    python stages/10_diagnose/clinic.py killed-rank            # kill -9 one rank, as the out-of-memory killer does
    python stages/10_diagnose/clinic.py killed-worker          # kill -9 a DataLoader worker of one rank
    python stages/10_diagnose/clinic.py nan-in-data            # a NaN written into a sample that one rank reads
    python stages/10_diagnose/clinic.py port-in-use            # rank 0's port taken by another program
    python stages/10_diagnose/clinic.py different-settings     # one rank started with another learning rate
    python stages/10_diagnose/clinic.py skipped-collective     # a rank skips a collective (a script of its own)
    python stages/10_diagnose/clinic.py exception-on-one-rank  # one rank raises (a script of its own)

Each case starts 2 processes of this stage's train.py (gloo, the `test` config, on a CPU; the last two run small
scripts of their own, as no one can make a rank skip a collective from outside), causes the failure, and prints
the lines of the log that show it, then what to look at. The runs go to runs/10_diagnose/clinic/<case>/.
A time-limit signal while one rank hangs needs Slurm: see the README (and tests/test_slurm_stages.py).
"""

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch.distributed

STAGE = Path(__file__).resolve().parent
sys.path.insert(0, str(STAGE.parent))
import common

TIMEOUT_S = 15  # ddp_timeout_s of the clinic's runs: the watchdog warns after a third of it
# 192 steps: the failures come after step 40, long before the end; gloo on the CPU, also where a GPU is
LONG_RUN = ["--config", "test", "--device", "cpu", "--num_epochs", "12", "--log_every", "40",
            "--ddp_timeout_s", str(TIMEOUT_S)]  # fmt: skip


class Run:
    """A command whose output lines are collected as they come (a thread reads them), so that the clinic can wait for
    one, then act."""

    def __init__(self, command, env=None):
        self.lines = []
        # In the clinic's own process group: a Ctrl-C reaches the run too, and torchrun ends its ranks.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(env or {})})  # fmt: skip
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout_s=60):
        """The first line that matches the regular expression; an error if none comes in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if re.search(pattern, line)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise common.UserError(f"no line matching {pattern!r} within {timeout_s} s; the output so far:\n"
                               + "\n".join(self.lines[-30:]))  # fmt: skip

    def end(self, timeout_s=90):
        """The exit code (None: it did not end within timeout_s, and was killed), and the time it took from now."""
        start = time.monotonic()
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            end_process_tree(self.process.pid)
            code = None
        time.sleep(0.2)  # the reading thread takes the last lines
        return code, time.monotonic() - start


def end_process_tree(pid):
    """SIGKILL a process and every process under it, the deepest first: torchrun starts each rank in a session of
    its own, so killing torchrun's process group would leave the ranks running."""
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        end_process_tree(int(child))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def signal_rank(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise common.UserError(f"process {pid} ended before the clinic could send it {signum.name}: the run was "
                               "over already; try again") from None


def torchrun(out_dir, *settings):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(STAGE / "train.py"), *LONG_RUN, *settings, "--out_dir", str(out_dir)]  # fmt: skip
    return Run(command, env={"OMP_NUM_THREADS": "1"})


def rank_pid(out_dir, rank):
    """A rank's pid, from the first line of its stacks file."""
    path = out_dir / "stacks" / f"rank{rank}.txt"
    for _ in range(100):
        if path.exists() and "pid" in path.read_text():
            return int(re.search(r"pid (\d+)", path.read_text()).group(1))
        time.sleep(0.1)
    raise common.UserError(f"{path} never named its process")


def show(title, lines):
    print(f"\n--- {title} ---")
    print("\n".join(lines))


def excerpt(run, *patterns):
    """The lines of the run's output that match any of the patterns."""
    return [line for line in run.lines if any(re.search(p, line) for p in patterns)]


def stopped_rank(out_dir):
    run = torchrun(out_dir)
    run.wait_for(r"step 40/")
    rank_1 = rank_pid(out_dir, 1)
    signal_rank(rank_1, signal.SIGSTOP)  # as a debugger, a full disk or a stuck file system can hold a process
    print(f"kill -STOP {rank_1} (rank 1): it no longer runs; rank 0 waits for it in the next collective")
    run.wait_for(r"has taken .* s \(the recent steps")
    files = [out_dir / "stacks" / f"rank{rank}.txt" for rank in (0, 1)]
    before = [len(path.read_text().splitlines()) for path in files]
    for rank in (0, 1):
        signal_rank(rank_pid(out_dir, rank), signal.SIGUSR2)
    time.sleep(1)
    written = [len(path.read_text().splitlines()) - lines for path, lines in zip(files, before)]
    print(f"kill -USR2 to both: within a second, rank 0 (waiting in a collective) wrote {written[0]} lines of stacks, "
          f"rank 1 {written[1]}")  # fmt: skip
    show("rank 0's stacks/rank0.txt, the end of its main thread", main_thread(files[0]))
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(rank_1)], capture_output=True, text=True).stdout.strip()
    print(f"\nrank 1 wrote nothing: its state is {state!r} (T: stopped). kill -CONT {rank_1}: it goes on, writes the "
          "stacks it was asked for, and the run with it")  # fmt: skip
    os.kill(rank_1, signal.SIGCONT)
    code, _ = run.end()
    show("the log", excerpt(run, r"has taken", r"^\S+ done in", r"^error"))
    show("rank 1's stacks/rank1.txt, the end of its main thread", main_thread(out_dir / "stacks" / "rank1.txt"))
    return code


def main_thread(path):
    """The main thread's innermost frames, down to the first of this tutorial's code, in the last stacks a rank
    wrote: of the threads faulthandler lists (each a "Thread 0x..." or "Current thread 0x..." line, then its frames,
    innermost first), the last whose outermost frame is train.py's `<module>`."""
    threads, thread = [], []
    for line in path.read_text().splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            thread = [line]
            threads.append(thread)
        elif line.startswith("  File ") and thread:
            thread.append(line)
    main = [thread for thread in threads if thread[-1].endswith("in <module>")]
    if not main:
        return ["(no stacks)"]
    ours = next(i for i, line in enumerate(main[-1]) if "/stages/" in line)
    return main[-1][: ours + 1]


def killed_rank(out_dir):
    run = torchrun(out_dir)
    run.wait_for(r"step 40/")
    rank_1 = rank_pid(out_dir, 1)
    signal_rank(rank_1, signal.SIGKILL)
    print(f"kill -9 {rank_1} (rank 1), as the out-of-memory killer would")
    code, seconds = run.end()
    show(f"the end, {seconds:.0f} s later", excerpt(run, r"^error", r"exitcode", r"Signal 9", r"Root Cause"))
    return code


def killed_worker(out_dir):
    run = torchrun(out_dir, "--num_workers", "1")
    run.wait_for(r"step 40/")
    workers = subprocess.run(["pgrep", "-P", str(rank_pid(out_dir, 0))], capture_output=True, text=True).stdout.split()
    signal_rank(int(workers[0]), signal.SIGKILL)
    print(f"kill -9 {workers[0]} (a DataLoader worker of rank 0)")
    code, seconds = run.end()
    show(f"the end, {seconds:.0f} s later", excerpt(run, r"^error", r"DataLoader worker", r"exitcode"))
    return code


def nan_in_data(out_dir):
    source = common.ensure_data("micro", out_dir / "clean")
    data = out_dir / "data" / "micro"
    shutil.copytree(source, data, dirs_exist_ok=True)
    samples = np.load(data / "train.npy", mmap_mode="r+")
    samples[123, 0, 5, 5] = np.nan  # one value of one sample: a bad write, a bad node
    samples.flush()
    print(f"a NaN written into sample 123 of {data / 'train.npy'}")
    run = torchrun(out_dir / "run", "--data_root", str(out_dir / "data"), "--num_epochs", "2")
    code, _ = run.end()
    show("the end", excerpt(run, r"^error"))
    return code


def two_ranks(out_dir, port, settings_of_rank_1=()):
    """Two processes of train.py started by hand, as a launcher would (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT),
    so that each can get settings of its own; their exit codes (the larger), once both have ended."""
    runs = [Run([sys.executable, str(STAGE / "train.py"), *LONG_RUN, "--num_epochs", "2", "--out_dir", str(out_dir),
                 *(settings_of_rank_1 if rank == 1 else [])],
                env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]  # fmt: skip
    codes = [run.end()[0] for run in runs]
    for rank, run in enumerate(runs):
        show(f"rank {rank}: exit code {codes[rank]}", excerpt(run, r"^error", r"^rank \d: error"))
    return max(code if code is not None else 1 for code in codes)


def port_in_use(out_dir):
    port = free_port()
    other_job = torch.distributed.TCPStore("127.0.0.1", port, is_master=True)  # as another job's rank 0 would
    print(f"port {port} taken by another job's rank 0 on this node; this run's ranks are told to meet there too")
    code = two_ranks(out_dir, port)
    del other_job
    return code


def different_settings(out_dir):
    print("rank 1 started with --base_lr 1e-3, rank 0 without")
    return two_ranks(out_dir, free_port(), ["--base_lr", "1e-3"])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_own_script(name):
    """One of the two cases that need a script of their own, under torchrun with 2 processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(STAGE / f"{name}.py")]  # fmt: skip
    return Run(command, env={"OMP_NUM_THREADS": "1"})


def skipped_collective(out_dir):
    run = run_own_script("skipped_collective")
    code, seconds = run.end()
    show(f"without TORCH_DISTRIBUTED_DEBUG: exit code {code} after {seconds:.0f} s", excerpt(run, r"rank \d: step",
         r"Error", r"exitcode"))  # fmt: skip
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    run = run_own_script("skipped_collective")
    code, seconds = run.end()
    show(f"with TORCH_DISTRIBUTED_DEBUG=DETAIL: after {seconds:.0f} s", excerpt(run, r"rank \d: step", r"mismatch"))
    return code


def exception_on_one_rank(out_dir):
    run = run_own_script("exception_on_one_rank")
    code, _ = run.end()
    show("the output", run.lines)
    return code


CASES = {"stopped-rank": stopped_rank, "killed-rank": killed_rank, "killed-worker": killed_worker,
         "nan-in-data": nan_in_data, "port-in-use": port_in_use, "different-settings": different_settings,
         "skipped-collective": skipped_collective, "exception-on-one-rank": exception_on_one_rank}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--out_dir", type=Path, help="default: runs/10_diagnose/clinic/<case> (or under $SCRATCH)")
    args = parser.parse_args()
    if args.out_dir and args.out_dir.exists() and any(args.out_dir.iterdir()):
        raise common.UserError(f"{args.out_dir} is not empty: give a new folder (the clinic breaks runs on purpose)")
    out_dir = args.out_dir or common.output_root("runs", default=Path("runs")) / STAGE.name / "clinic" / args.case
    if not args.out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)  # the clinic's own folder: each case starts from nothing
    out_dir.mkdir(parents=True, exist_ok=True)
    code = CASES[args.case](out_dir)
    print(f"\nexit code {code}")


if __name__ == "__main__":
    try:
        main()
    except common.UserError as error:
        sys.exit(f"error: {error}")
