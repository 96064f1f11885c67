"""common.StepTimer, the timing behind every stage's progress line and summary, on a clock the test moves."""

import logging

import pytest

import common
from common import timing


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def slow_batches(clock, waits):
    """Batches that each take `wait` seconds to arrive."""
    for index, wait in enumerate(waits):
        clock.now += wait
        yield index


def test_the_first_step_is_timed_apart_and_a_window_gives_rate_wait_and_eta(clock, caplog):
    timer = common.StepTimer(batch_size=32, total_steps=10, log=logging.getLogger("test"))
    with caplog.at_level(logging.INFO):
        for _ in timer.timed(slow_batches(clock, [3.0, 0.5, 0.5])):
            clock.now += 1.0  # the step
            timer.step_done()
    assert "first step: 4.0 s, not counted in samples/s" in caplog.text
    assert timer.steps == 2 and timer.wait == pytest.approx(1.0)
    samples_per_s, wait, eta = timer.window(step=3)
    assert samples_per_s == pytest.approx(2 * 32 / 3.0)  # 2 steps of 32 samples in 3 s
    assert wait == pytest.approx(1.0 / 3.0)
    assert eta == "00:00:11"  # 7 steps left at 1.5 s each: 10.5 s, rounded up
    assert timer.steps == 0 and timer.wait == 0.0, "a window ends where the next begins"


def test_a_wait_given_for_the_window_replaces_this_process_own(clock):
    """From stage 06 on, the window's data wait is the mean over the ranks."""
    timer = common.StepTimer(32, 10, logging.getLogger("test"))
    timer.first_step = False
    for _ in timer.timed(slow_batches(clock, [1.0, 1.0])):
        clock.now += 1.0
        timer.step_done()
    _, wait, _ = timer.window(step=2, wait=0.5)
    assert wait == pytest.approx(0.5 / 4.0)
    assert timer.totals["wait_time"] == pytest.approx(0.5)


def test_the_totals_of_a_resumed_run_continue_from_its_checkpoint(clock):
    first = common.StepTimer(32, 4, logging.getLogger("test"))
    first.first_step = False
    for _ in first.timed(slow_batches(clock, [0.0, 0.0])):
        clock.now += 2.0
        first.step_done()
    first.window(step=2)
    saved = first.totals_now()
    assert saved["timed_steps"] == 2 and saved["train_time"] == pytest.approx(4.0)
    assert saved["wall_time"] == pytest.approx(4.0)

    second = common.StepTimer(32, 4, logging.getLogger("test"), totals=saved)
    second.first_step = False
    for _ in second.timed(slow_batches(clock, [0.0, 0.0])):
        clock.now += 1.0
        second.step_done()
    second.window(step=4)
    summary = second.summary()
    assert summary["samples_per_s"] == pytest.approx(4 * 32 / 6.0), "both processes' steps and time"
    assert summary["wall_time_s"] == pytest.approx(6.0)
    assert saved["timed_steps"] == 2, "the checkpoint's totals are not changed in place"


def test_a_run_without_a_timed_step_gives_rates_of_zero(clock):
    timer = common.StepTimer(32, 1, logging.getLogger("test"))
    assert timer.summary()["samples_per_s"] == 0.0


def test_the_validation_and_checkpoint_between_two_epochs_are_not_training_time(clock):
    """An epoch ends with a progress line (a window ends); the next epoch's batches start a new window, so the
    validation between (which recompiles a compiled model) counts neither in samples/s nor in the data wait."""
    timer = common.StepTimer(32, 10, logging.getLogger("test"))
    timer.first_step = False
    for _ in timer.timed(slow_batches(clock, [1.0])):
        clock.now += 1.0
        timer.step_done()
    timer.window(step=1)  # the epoch's last progress line
    clock.now += 30.0  # validation and a checkpoint
    for _ in timer.timed(slow_batches(clock, [1.0])):
        clock.now += 1.0
        timer.step_done()
    samples_per_s, wait, _ = timer.window(step=2)
    assert samples_per_s == pytest.approx(32 / 2.0) and wait == pytest.approx(0.5)
    assert timer.totals["train_time"] == pytest.approx(4.0)
