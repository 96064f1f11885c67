"""Stage 10's concept: a running job can tell you where each of its ranks is, also when one is stuck.

- On demand: `kill -USR2 <pid>` makes a rank append the stack of every one of its threads to
  <out_dir>/stacks/rank<r>.txt, and the run goes on. Python's faulthandler writes it from a C signal handler, so it
  works while the main thread waits inside a collective: a handler set with signal.signal would run only once the
  collective returned, which in a hang is never. (USR1 is taken: it stops the run, as Slurm's time-limit signal.)
- A slow step: a watchdog thread warns, with the rank, the step and where the main thread waits, when a step takes
  far longer than the recent ones, long before a collective gives up after ddp_timeout_s. Validation and the
  checkpoints are not steps: the loop says when they begin, and they are slow only at a third of ddp_timeout_s
  (their collectives can hang too). The warning also says which collective the rank
  waits in, by its number, from PyTorch's flight recorder: the rank whose number is behind the others' is stuck.
"""

import collections
import dataclasses
import faulthandler
import logging
import os
import pickle
import signal
import socket
import statistics
import sys
import threading
import time
import traceback

import torch

log = logging.getLogger(__name__)

STACK_SIGNAL = signal.SIGUSR2
SLOW_FACTOR = 20  # a step is slow at 20 times the median of the recent ones...
SLOW_FLOOR_S = 5.0  # ...and never under 5 s: a busy machine can hold up a short step for a second or two
RECENT_STEPS = 50


@dataclasses.dataclass
class Heartbeat:
    """Where the training loop is, written by it and read by the watchdog thread. `now` changes in one assignment, so
    that the thread never reads half of it."""

    now: tuple | None = None  # (what: "step 42" or "the checkpoint of step 40"..., since when, whether it is a step)
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=RECENT_STEPS))
    warned_for: float | None = None  # the start time of what the last warning was about: one warning each


heartbeat = Heartbeat()
stacks_file = None  # rank r's stacks/rank<r>.txt, open for as long as the process lives: faulthandler writes to it


def write_stacks_on_signal(out_dir, rank):
    """From now on, USR2 appends every thread's stack to <out_dir>/stacks/rank<r>.txt. Call it before the DataLoader
    workers start: they inherit it, and data_loading.start_worker then ignores USR2 in them (as Slurm may signal
    every process of a job step, workers too)."""
    global stacks_file
    folder = out_dir / "stacks"
    folder.mkdir(parents=True, exist_ok=True)
    stacks_file = open(folder / f"rank{rank}.txt", "a")
    stacks_file.write(f"rank {rank}, pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%T')}\n")
    stacks_file.flush()
    faulthandler.register(STACK_SIGNAL, file=stacks_file, all_threads=True, chain=False)
    log.info(f"stacks on demand: `kill -USR2 <pid>` (each rank's pid heads its file) appends every thread's stack to "
             f"{folder}/rank<r>.txt, and the run goes on")  # fmt: skip


def slow_step_limit(recent, timeout_s):
    """Seconds after which the current step is slow: SLOW_FACTOR times the median of the recent steps, at least
    SLOW_FLOOR_S, and at most a third of ddp_timeout_s, so that the warning comes while the collective still waits."""
    return min(max(SLOW_FACTOR * statistics.median(recent), SLOW_FLOOR_S), timeout_s / 3)


def step_begins(step):
    """At the start of each step of the loop: the step before it, if one ran to here, joins the recent ones."""
    now = time.perf_counter()
    if heartbeat.now and heartbeat.now[2]:
        heartbeat.recent.append(now - heartbeat.now[1])
    heartbeat.now = (f"step {step + 1}", now, True)


def other_work(doing):
    """Before validation, a checkpoint, the end: work that is not a step, slow only at a third of ddp_timeout_s."""
    heartbeat.now = (doing, time.perf_counter(), False)


def start_watchdog(rank, timeout_s):
    thread = threading.Thread(target=watch, args=(rank, timeout_s), name="slow-step watchdog", daemon=True)
    thread.start()


def watch(rank, timeout_s):
    """The watchdog thread: twice a second, is what the loop does slow? (Never the first steps: they compile, start
    the workers, fill caches; three steps make the first median.)"""
    while True:
        time.sleep(0.5)
        now, recent = heartbeat.now, list(heartbeat.recent)
        if now is None or heartbeat.warned_for == now[1] or len(recent) < 3:
            continue
        doing, started, in_step = now
        seconds = time.perf_counter() - started
        if seconds > (slow_step_limit(recent, timeout_s) if in_step else timeout_s / 3):
            heartbeat.warned_for = started
            named = "rank 0: " if rank == 0 else ""  # the other ranks' log lines begin with their rank already
            log.warning(f"{named}{doing} has taken {seconds:.1f} s (the recent steps: {statistics.median(recent):.3f} "
                        f"s); it waits in {where_main_thread_is()}; "
                        f"{last_collectives(rank)}. Every thread's stack: {stacks_file.name}. A collective fails "
                        f"after ddp_timeout_s = {timeout_s:g} s: look at the other ranks' stacks now (`kill -USR2 "
                        "<pid>` each)")  # fmt: skip
            stacks_file.write(f"--- {time.strftime('%T')}: {doing} is slow ---\n")
            stacks_file.flush()
            faulthandler.dump_traceback(file=stacks_file, all_threads=True)


def where_main_thread_is(frames=3):
    """The main thread's innermost Python frames, as file:line function, innermost first."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    stack = traceback.extract_stack(frame)[-frames:] if frame else []
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno or '?'} {f.name}" for f in reversed(stack)) or "?"


def last_collectives(rank):
    """Which collective this rank is in, from PyTorch's flight recorder (in torch 2.14 it records gloo's collectives
    too): the number of the last one it entered and of the last one that completed, its kind and sizes. The whole
    record goes to stacks/flight-rank<r>.pkl (a pickle, as NCCL's dumps are)."""
    dump = getattr(torch._C._distributed_c10d, "_dump_fr_trace", None)  # not public: it may move or go
    try:
        record = pickle.loads(dump(True, False, False))
        with open(os.path.join(os.path.dirname(stacks_file.name), f"flight-rank{rank}.pkl"), "wb") as file:
            pickle.dump(record, file)
        status = record["pg_status"]["0"]
        last = record["entries"][-1]
        return (f"flight recorder: collective #{status['last_enqueued_collective']} entered ({last['profiling_name']} "
                f"of {last['input_sizes']}), #{status['last_completed_collective']} the last completed")
    except Exception as error:  # noqa: BLE001 (a diagnosis must not end the run it diagnoses)
        return f"flight recorder: not available ({type(error).__name__})"
