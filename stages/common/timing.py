"""The timing behind the progress line and the summary: samples/s, the share of time spent waiting for data, the
first step's time and the ETA. Every stage times its steps this same way; it is plumbing, not a stage's idea.

    timer = common.StepTimer(batch_size, total_steps, log)
    for delta, phi in timer.timed(loader):  # adds the time spent waiting for each batch
        ...                                 # take a step
        timer.step_done()                   # the first step is timed apart: it starts workers, compiles
        if step % log_every == 0:
            samples_per_s, wait_share, eta = timer.window(step)   # the steps since the last window
"""

import math
import time

import torch

# What the timer adds up over a run; a resumed run starts from the totals stored in its checkpoint.
NEW_TOTALS = {"train_time": 0.0, "wait_time": 0.0, "timed_steps": 0, "wall_time": 0.0, "first_step_time": 0.0}


class StepTimer:
    def __init__(self, batch_size, total_steps, log, totals=None):
        self.batch_size, self.total_steps, self.log = batch_size, total_steps, log
        self.totals = dict(totals or NEW_TOTALS)
        self.start = time.perf_counter()
        self.first_step = True
        self.new_window()

    def new_window(self):
        self.steps, self.wait, self.window_start = 0, 0.0, time.perf_counter()

    def timed(self, batches):
        """The batches, one by one, adding the time spent waiting for each to the window's data wait. An epoch's
        batches start a new window if the last one ended with no step since: the validation and checkpoint between
        two epochs are not training (a compiled model compiles again for validation, which took seconds)."""
        if self.steps == 0 and not self.first_step:
            self.new_window()
        batches = iter(batches)
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.wait += time.perf_counter() - wait_start
            yield batch

    def step_done(self):
        """Count a step. The first step of a process is timed apart and not counted in samples/s: it starts the
        DataLoader's workers, and compiles with --compile true."""
        if not self.first_step:
            self.steps += 1
            return
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the GPU runs behind the CPU: wait for it to finish the step
        seconds = time.perf_counter() - self.window_start
        self.totals["first_step_time"] += seconds
        self.log.info(f"first step: {seconds:.1f} s, not counted in samples/s")
        self.first_step = False
        self.new_window()

    def window(self, step, wait=None):
        """(samples/s, share of the time spent waiting for data, ETA as hours:minutes:seconds) over the steps since
        the last window, which this one ends. wait: the window's data wait (by default this process's own)."""
        elapsed = time.perf_counter() - self.window_start
        wait = self.wait if wait is None else wait
        samples_per_s = self.steps * self.batch_size / elapsed
        eta_s = max(0, self.total_steps - step) * elapsed / max(self.steps, 1)
        self.totals["train_time"] += elapsed
        self.totals["wait_time"] += wait
        self.totals["timed_steps"] += self.steps
        self.new_window()
        return samples_per_s, wait / elapsed, time.strftime("%H:%M:%S", time.gmtime(math.ceil(eta_s)))

    def totals_now(self):
        """The totals so far, the time of this process included: what a checkpoint stores."""
        return {**self.totals, "wall_time": self.totals["wall_time"] + time.perf_counter() - self.start}

    def summary(self):
        """The figures of the whole run (every process of a resumed run) for summary.json."""
        totals = self.totals_now()
        train_time = max(totals["train_time"], 1e-9)  # no timed step (a run of one step): rates of 0, not an error
        return {
            "samples_per_s": totals["timed_steps"] * self.batch_size / train_time,
            "data_wait_share": totals["wait_time"] / train_time,
            "wall_time_s": totals["wall_time"],
            "first_step_s": totals["first_step_time"],
        }
