"""The learning-rate rule (linear batch scaling, warmup) and the divergence guard."""

from __future__ import annotations

import logging
import math

import pytest

from flwr_splitms.config import ConfigError, SplitConfig
from flwr_splitms.core.divergence import DivergenceError, DivergenceGuard
from flwr_splitms.core.round import RoundPlan
from flwr_splitms.core.schedule import LR_REFERENCE_BATCH, scaled_lr, warmup_factor
from flwr_splitms.local import run_local


def test_lr_is_the_rate_at_batch_64_and_scales_linearly() -> None:
    assert LR_REFERENCE_BATCH == 64
    assert scaled_lr(0.1, 64, "linear") == pytest.approx(0.1)
    assert scaled_lr(0.1, 16, "linear") == pytest.approx(0.025)
    assert scaled_lr(0.1, 256, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 16, "none") == 0.1  # the paper's setting
    with pytest.raises(ValueError, match="unknown lr scaling 'sqrt'; choose one of"):
        scaled_lr(0.1, 16, "sqrt")


def test_warmup_ramps_linearly_over_the_runs_first_steps() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    plan = RoundPlan.from_config(SplitConfig(batch_size=32, warmup_steps=4, lr_schedule="constant"))
    late = plan.settings(2, 3, step_offset=3)  # the second round starts at the run's 4th step
    assert late.lr == pytest.approx(0.05)
    assert [late.lr_at(s) for s in (0, 1)] == pytest.approx([0.05, 0.05])
    early = plan.settings(1, 3)
    assert [early.lr_at(s) for s in (0, 1, 3)] == pytest.approx([0.0125, 0.025, 0.05])


def test_the_config_defaults_and_the_papers_switch() -> None:
    config = SplitConfig()
    assert (config.lr, config.lr_scaling, config.warmup_steps) == (0.1, "linear", 10)
    paper = SplitConfig(lr_scaling="none", warmup_steps=0, batch_size=8)
    assert RoundPlan.from_config(paper).round_lr(1, 1) == 0.1
    with pytest.raises(ConfigError, match="lr-scaling"):
        SplitConfig.from_run_config({"lr-scaling": "quadratic"})


def test_a_non_finite_loss_stops_with_the_facts(caplog: pytest.LogCaptureFixture) -> None:
    guard = DivergenceGuard(batch_size=16)
    guard.check_steps([2.3, 2.1], server_round=1, first_step=0, lr=0.025)
    assert guard.initial == 2.3
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(DivergenceError) as err:
        guard.check_steps([math.nan], server_round=3, first_step=6, lr=0.4)
    message = str(err.value)
    for fact in ("round 3", "step 7", "lr 0.4", "batch-size 16", "Fix: lower lr"):
        assert fact in message
    assert caplog.records[-1].getMessage() == message  # one ERROR line before the traceback


def test_activations_gone_non_finite_everywhere_are_divergence() -> None:
    guard = DivergenceGuard(batch_size=8)
    guard.check_uploads(["activations hold NaN or Inf"], sent=2, server_round=1, step=0, lr=0.1)
    with pytest.raises(DivergenceError, match="every client's activations hold NaN or Inf"):
        guard.check_uploads(["activations hold NaN or Inf"] * 2, 2, 1, 0, 0.1)


def test_a_round_far_above_the_start_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = DivergenceGuard(batch_size=8, initial=2.3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert not guard.end_round([2.0, 9.0], 1, 0.1)  # one step below: not a whole round
        assert guard.end_round([7.5, 9.0, 6.0], 2, 0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "round 2" in lines[0] and "batch-size 8" in lines[0]


def test_a_diverging_local_run_stops_before_a_nan_row(tiny_config: SplitConfig) -> None:
    config = tiny_config.replace(lr=1e6, lr_scaling="none", warmup_steps=0, steps_per_round=4)
    rows: list[dict] = []  # type: ignore[type-arg]
    with pytest.raises(DivergenceError, match="Training diverged"):
        run_local(config, 2, evaluate=False, round_callback=lambda r, row: rows.append(row))
    assert all(math.isfinite(row["train_loss"]) for row in rows)
