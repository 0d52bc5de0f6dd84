"""Progress lines during a round: the round as ``round r/n`` and the time left in the run."""

from __future__ import annotations

import logging
import time

import pytest

from flwr_splitms.core.accounting import StepProgress


class Clock:
    """A ``time.monotonic`` that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "monotonic", fake)
    return fake


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr"]


def test_later_rounds_take_as_long_as_the_finished_ones(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    run_started = clock.now
    clock.now += 100.0  # round 1, with its evaluation and checkpoint, took 100 s
    progress = StepProgress("", 100, server_round=2, num_rounds=5, run_started=run_started)
    clock.now += 30.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        progress.update(40, 2.10341)
    # 60 steps at 40 per 30 s: 45 s; then rounds 3-5 at 100 s each: 345 s
    assert _lines(caplog) == [
        "round 2/5: step 40/100, loss 2.1034, about 45s left in the round, about 6m left in the run"
    ]


def test_before_a_round_finished_the_run_is_this_round_times_the_rounds_left(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    progress = StepProgress(
        "[local]", 100, server_round=1, num_rounds=3, run_started=clock.now, first_round=1
    )
    clock.now += 30.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        progress.update(12, 0.5)
    # 88 steps at 0.4/s: 220 s; the round takes 250 s, two more: 720 s
    assert _lines(caplog) == [
        "[local] round 1/3: step 12/100, loss 0.5000, about 4m left in the round, "
        "about 12m left in the run"
    ]


def test_a_resumed_run_does_not_count_the_rounds_of_the_earlier_process(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    start = clock.now
    clock.now += 50.0  # round 7 (the first of this process) took 50 s
    progress = StepProgress(
        "", 10, interval=1.0, server_round=8, num_rounds=9, run_started=start, first_round=7
    )
    clock.now += 20.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        progress.update(5, 1.0)
    assert _lines(caplog)[-1].endswith("about 20s left in the round, about 70s left in the run")
    resumed = StepProgress("", 10, server_round=7, num_rounds=9, run_started=start, first_round=7)
    clock.now += 40.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        resumed.update(5, 1.0)  # no round finished here yet: 80 s per round, 2 more after this
    assert _lines(caplog)[-1].endswith("about 40s left in the round, about 3m left in the run")


def test_one_line_per_interval_and_none_at_the_last_step(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    progress = StepProgress("", 10, server_round=1, num_rounds=1)
    with caplog.at_level(logging.INFO, logger="flwr"):
        clock.now += 29.0
        progress.update(3, 1.0)  # before the interval
        clock.now += 1.0
        progress.update(4, 1.0)
        clock.now += 10.0
        progress.update(5, 1.0)  # 10 s after the last line
        clock.now += 60.0
        progress.update(10, 1.0)  # the round is over
    (line,) = _lines(caplog)
    assert line == (
        "round 1/1: step 4/10, loss 1.0000, about 45s left in the round, about 45s left in the run"
    )


def test_the_old_call_still_works(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    progress = StepProgress("Round 3", 10)
    clock.now += 30.0
    with caplog.at_level(logging.INFO, logger="flwr"):
        progress.update(5, 1.0)
    assert _lines(caplog) == ["Round 3: step 5/10, loss 1.0000, about 30s left in the round"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (45, "45s"), (99, "99s"), (100, "2m"), (345, "6m"), (5939, "99m"),
     (5970, "1h 40m"), (7500, "2h 05m")],
)  # fmt: skip
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert StepProgress.duration(seconds) == text
