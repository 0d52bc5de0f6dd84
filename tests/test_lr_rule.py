"""The learning-rate rule (batch scaling, warmup, output-layer share) and the divergence guard."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from flwr_splitms.config import ConfigError, SplitConfig
from flwr_splitms.core.divergence import DivergenceError, DivergenceGuard
from flwr_splitms.core.round import RoundPlan, SplitRun
from flwr_splitms.core.schedule import LR_REFERENCE_BATCH, scaled_lr, warmup_factor
from flwr_splitms.core.server_half import SplitServerCore, output_layer
from flwr_splitms.experiment import build_split_model
from flwr_splitms.local import run_local


def test_lr_is_the_rate_at_batch_64_and_scales_with_the_batch() -> None:
    assert LR_REFERENCE_BATCH == 64
    assert scaled_lr(0.1, 64, "linear") == pytest.approx(0.1)
    assert scaled_lr(0.1, 16, "linear") == pytest.approx(0.025)
    assert scaled_lr(0.1, 256, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 16, "none") == 0.1  # the paper's setting
    assert scaled_lr(0.1, 16, "sqrt") == pytest.approx(0.05)  # the square-root rule
    assert scaled_lr(0.1, 256, "sqrt") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown lr scaling 'cubic'; choose one of"):
        scaled_lr(0.1, 16, "cubic")


def test_warmup_ramps_linearly_over_the_runs_first_steps() -> None:
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    settings = {"lr_scaling": "linear", "warmup_steps": 4, "lr_schedule": "constant"}
    plan = RoundPlan.from_config(SplitConfig(batch_size=32, **settings))
    late = plan.settings(2, 3, step_offset=3)  # the second round starts at the run's 4th step
    assert late.lr == pytest.approx(0.05)
    assert [late.lr_at(s) for s in (0, 1)] == pytest.approx([0.05, 0.05])
    early = plan.settings(1, 3)
    assert [early.lr_at(s) for s in (0, 1, 3)] == pytest.approx([0.0125, 0.025, 0.05])


def test_the_config_defaults_and_the_papers_switch() -> None:
    config = SplitConfig()
    assert (config.lr, config.lr_scaling, config.warmup_steps) == (0.1, "sqrt", 10)
    at_16 = RoundPlan.from_config(config.replace(batch_size=16))
    assert at_16.round_lr(1, 1) == pytest.approx(0.05)  # the square-root rule
    assert config.head_lr_scale == 0.1
    paper = SplitConfig(lr_scaling="none", warmup_steps=0, head_lr_scale=1, batch_size=8)
    assert RoundPlan.from_config(paper).round_lr(1, 1) == 0.1
    server = SplitRun.build(nn.Sequential(nn.Linear(4, 3)), RoundPlan.from_config(paper)).server
    assert [g["lr"] for g in server.optimizer.param_groups] == [0.1]
    with pytest.raises(ConfigError, match="head-lr-scale"):
        SplitConfig.from_run_config({"head-lr-scale": -1})
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


def _server(head_lr_scale: float, lr: float = 0.1) -> SplitServerCore:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    return SplitServerCore(
        model, lr=lr, momentum=0.9, weight_decay=0.0, head_lr_scale=head_lr_scale
    )


def test_the_output_layer_trains_at_its_share_of_the_rate() -> None:
    server = _server(0.1)
    head = output_layer(server.model)
    assert head is server.model[2]  # the last nn.Linear, even with a layer after it
    server.set_lr(0.4)
    rates = {id(p): g["lr"] for g in server.optimizer.param_groups for p in g["params"]}
    assert [rates[id(p)] for p in head.parameters()] == pytest.approx([0.04, 0.04])
    assert [rates[id(p)] for p in server.model[0].parameters()] == [0.4, 0.4]
    no_linear = SplitServerCore(nn.Conv2d(2, 3, 1), lr=0.2, momentum=0.0, weight_decay=0.0)
    assert [g["lr"] for g in no_linear.optimizer.param_groups] == [0.2]  # nothing to scale
    with pytest.raises(ValueError, match="head_lr_scale must be >= 0"):
        _server(-0.5)


def test_a_frozen_output_layer_keeps_its_weights_through_a_run(tiny_config: SplitConfig) -> None:
    before = {k: v.clone() for k, v in build_split_model(tiny_config)[1].state_dict().items()}
    after = run_local(tiny_config.replace(head_lr_scale=0.0), 2, evaluate=False).server_weights
    head = [k for k in before if k.startswith("head.fc.")]
    assert head and all(torch.equal(after[k], before[k]) for k in head)
    assert not torch.equal(after["layer4_1.conv2.weight"], before["layer4_1.conv2.weight"])


def test_a_checkpoint_with_one_optimizer_group_is_regrouped() -> None:
    """Checkpoints from before the output layer had its own group resume with its momentum."""
    old = _server(1.0)
    legacy = torch.optim.SGD(old.model.parameters(), lr=0.1, momentum=0.9)
    for p in old.model.parameters():
        p.grad = torch.randn_like(p)
    legacy.step()
    new = _server(0.1)
    new.load_optimizer_state(legacy.state_dict())
    for (name, p), q in zip(new.model.named_parameters(), old.model.parameters(), strict=True):
        buf = new.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(buf, legacy.state[q]["momentum_buffer"]), name
    assert [g["lr_scale"] for g in new.optimizer.param_groups] == [1.0, 0.1]
    new.set_lr(0.5)
    assert [g["lr"] for g in new.optimizer.param_groups] == pytest.approx([0.5, 0.05])


def test_the_run_config_key_reaches_the_flower_strategys_optimizer() -> None:
    from flwr_splitms.strategy import MSSplitStrategy

    config = SplitConfig.from_run_config({"head-lr-scale": 0.25, "batch-size": 64})
    strategy = MSSplitStrategy.from_config(config, nn.Sequential(nn.Flatten(), nn.Linear(8, 10)))
    strategy.run.server.set_lr(0.1)
    assert [g["lr"] for g in strategy.run.server.optimizer.param_groups] == [pytest.approx(0.025)]
    assert strategy.plan.head_lr_scale == 0.25
