"""codec = "budget" in both engines: never over budget, both sides agree, refusal, resume."""

from __future__ import annotations

import math

import pytest
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms.checkpoint import latest_run_state
from flwr_splitms.config import SplitConfig
from flwr_splitms.core import round as round_module
from flwr_splitms.core.budget import BudgetError, budget_nbytes
from flwr_splitms.local import run_local
from flwr_splitms.protocol import state_to_record

BITS = 2.3222  # what MS 0.99 / 2 bits costs (strategies/budget.toml)


@pytest.fixture
def budget_config(tiny_config: SplitConfig) -> SplitConfig:
    return tiny_config.replace(codec="budget", budget_bits=BITS, num_server_rounds=2)


def record_uploads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte length of every activation message the server receives."""
    sizes: list[int] = []
    original = round_module.RoundAccumulator.uplink

    def uplink(self, upload):  # type: ignore[no-untyped-def]
        sizes.extend(len(blob) for blob in upload.blobs)
        return original(self, upload)

    monkeypatch.setattr(round_module.RoundAccumulator, "uplink", uplink)
    return sizes


def test_no_message_is_over_budget_and_the_choice_is_recorded(
    budget_config: SplitConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_uploads(monkeypatch)
    history = run_local(budget_config, 2).history
    limit = budget_nbytes(BITS, budget_config.batch_size * 64 * 32 * 32)  # shallow cut
    assert sizes and max(sizes) <= limit
    assert history["codec_choice"].notna().all() and history["budget_error"].gt(0).all()
    assert history["dropped_clients"].eq(0).all()
    assert history["train_loss"].map(math.isfinite).all()


def test_both_sides_agree_over_flower_messages(budget_config: SplitConfig) -> None:
    """The choice travels in the round's config: the server decodes every client's upload, and
    the message path gives the local engine's run."""
    grid = InProcessGrid(client_app(), 2, budget_config.to_run_config())
    client_net, strat = strategy(budget_config)
    result = strat.start(grid, state_to_record(client_net.state_dict()), num_rounds=2, timeout=60)
    local = run_local(budget_config, 2, evaluate=False)
    flower = result.history
    assert flower["dropped_clients"].eq(0).all()
    assert list(flower["codec_choice"]) == list(local.history["codec_choice"])
    assert flower["train_loss"].tolist() == pytest.approx(
        local.history["train_loss"].tolist(), rel=1e-5
    )
    assert "train.split_probe" in grid.message_types


def test_an_impossible_budget_is_refused_naming_the_smallest(budget_config: SplitConfig) -> None:
    with pytest.raises(BudgetError, match=r"smallest feasible budget [0-9.]+"):
        run_local(budget_config.replace(budget_bits=0.001), 2, evaluate=False)


def test_resume_keeps_the_current_choice(budget_config: SplitConfig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = budget_config.replace(num_server_rounds=3, budget_every=5, lr_schedule="constant")
    whole = run_local(config, 2, evaluate=False)
    first = run_local(
        config.replace(num_server_rounds=2), 2, evaluate=False, checkpoint_dir=tmp_path
    )
    state = latest_run_state(tmp_path)
    assert state is not None and state.budget is not None and state.budget["round"] == 1
    resumed = run_local(config, 2, evaluate=False, resume=state)
    assert list(resumed.history["codec_choice"]) == list(whole.history["codec_choice"])
    assert resumed.history["train_loss"].tolist() == pytest.approx(
        whole.history["train_loss"].tolist(), rel=1e-6
    )
    assert first.history["codec_choice"].nunique() == 1


def test_a_gradient_budget_holds_and_both_engines_agree(
    tiny_config: SplitConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config.replace(grad_budget_bits=4.0, num_server_rounds=2, lr_schedule="constant")
    sizes: list[int] = []
    original = round_module.RoundAccumulator.downlink

    def downlink(self, blobs):  # type: ignore[no-untyped-def]
        sizes.extend(len(blob) for blob in blobs)
        return original(self, blobs)

    monkeypatch.setattr(round_module.RoundAccumulator, "downlink", downlink)
    local = run_local(config, 2, evaluate=False).history
    assert sizes and max(sizes) <= budget_nbytes(4.0, config.batch_size * 64 * 32 * 32)
    assert local["grad_codec_choice"].notna().all()
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    client_net, strat = strategy(config)
    flower = strat.start(grid, state_to_record(client_net.state_dict()), num_rounds=2).history
    assert list(flower["grad_codec_choice"]) == list(local["grad_codec_choice"])
    assert flower["train_loss"].tolist() == pytest.approx(local["train_loss"].tolist(), rel=1e-5)
