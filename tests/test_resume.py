"""Runs that survive: checkpoints every round, and a resumed run equals the uninterrupted one."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms import protocol as P
from flwr_splitms.checkpoint import (
    checkpoint_path,
    config_differences,
    latest_run_state,
    load_run_state,
    save_run_state,
)
from flwr_splitms.config import SplitConfig
from flwr_splitms.local import run_local

TIMING = ["round_seconds", "client_seconds", "server_seconds", "message_seconds"]


class Interrupted(Exception):
    pass


def _stop_after(last: int):  # type: ignore[no-untyped-def]
    def callback(server_round: int, *_: object) -> None:
        if server_round == last:
            raise Interrupted

    return callback


def assert_same_history(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.drop(columns=TIMING, errors="ignore"), b.drop(columns=TIMING, errors="ignore")
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def config(tiny_config: SplitConfig) -> SplitConfig:
    return tiny_config.replace(num_server_rounds=4, fraction_train=0.67, steps_per_round=3)


def test_local_engine_resumes_exactly(config: SplitConfig, tmp_path: Path) -> None:
    full = run_local(config, 3, evaluate=False)
    with pytest.raises(Interrupted):
        run_local(config, 3, evaluate=False, checkpoint_dir=tmp_path, round_callback=_stop_after(2))
    state = latest_run_state(tmp_path)
    assert state is not None and state.server_round == 2
    resumed = run_local(config, 3, evaluate=False, resume=state)
    assert_same_state(resumed.client_weights, full.client_weights)
    assert_same_state(resumed.server_weights, full.server_weights)
    assert_same_history(resumed.history, full.history)


def test_flower_run_resumes_in_a_new_run(config: SplitConfig) -> None:
    """A new run (fresh nodes, no client state) continues from the server's checkpoint.

    Exact: clients restart momentum every round and the server sends each client its data
    cursor, so nothing the next round needs lived only on the nodes.
    """
    config = config.replace(fraction_train=1.0)

    def start(grid: InProcessGrid, num_rounds: int, resume=None, callback=None):  # type: ignore[no-untyped-def]
        client_net, strat = strategy(config)
        if callback is not None:
            strat.round_callbacks.append(lambda r, arrays, row: callback(r, strat, arrays))
        arrays = P.state_to_record(client_net.state_dict())
        return strat, strat.start(grid, arrays, num_rounds=num_rounds, resume=resume)

    full_strat, full = start(InProcessGrid(client_app(), 2, config.to_run_config()), 4)
    saved = {}

    def keep(server_round: int, strat, arrays) -> None:  # type: ignore[no-untyped-def]
        saved["state"] = strat.run_state(server_round, arrays)
        if server_round == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        start(InProcessGrid(client_app(), 2, config.to_run_config(), run_id=8), 4, callback=keep)
    fresh = InProcessGrid(client_app(), 2, config.to_run_config(), run_id=9)
    resumed_strat, resumed = start(fresh, 4, resume=saved["state"])
    assert_same_state(P.record_to_state(resumed.arrays), P.record_to_state(full.arrays))
    assert_same_state(resumed_strat.server_model.state_dict(), full_strat.server_model.state_dict())
    assert_same_history(resumed.history, full.history)


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(
    config: SplitConfig, tmp_path: Path
) -> None:
    run_local(config.replace(keep_checkpoints=2), 2, evaluate=False, checkpoint_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-round-0003.pt", "checkpoint-round-0004.pt"]
    state = load_run_state(checkpoint_path(tmp_path, 4))
    assert state.server_round == 4 and len(state.history) == 4
    assert state.run_config == config.replace(keep_checkpoints=2).to_run_config()
    (tmp_path / "checkpoint-round-0005.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        latest_run_state(tmp_path)
    (tmp_path / "checkpoint-round-0005.pt").unlink()
    save_run_state(tmp_path, state, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-round-0004.pt"]


def test_config_differences_name_the_keys() -> None:
    saved = {"lr": 0.1, "codec": "ms", "resume": False, "num-server-rounds": 4}
    current = {"lr": 0.2, "codec": "ms", "resume": True, "num-server-rounds": 10}
    assert config_differences(saved, current) == ["lr: 0.1 -> 0.2"]


def test_a_checkpoint_holds_each_tensor_once_and_says_its_size(
    config: SplitConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_local(config.replace(num_server_rounds=2), 2, evaluate=False, checkpoint_dir=tmp_path)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checkpoint:")]
    assert len(said) == 1  # at the first save only
    path = checkpoint_path(tmp_path, 2)
    assert sorted(tmp_path.iterdir()) == [path]  # keep-checkpoints defaults to 1
    state = load_run_state(path)
    momentum = [t for s in state.server_optimizer["state"].values() for t in s.values()]
    tensors = [*state.client_weights.values(), *state.server_weights.values(), *momentum]
    assert {t.dtype for t in tensors} <= {torch.float32, torch.int64}  # no float64 copies
    payload = sum(t.numel() * t.element_size() for t in tensors)
    size = path.stat().st_size
    assert payload <= size < 1.01 * payload + 100_000  # every tensor stored once
    assert said[0].startswith(f"Checkpoint: {size / 1e6:.1f} MB per round (server weights")
    assert "keeping the newest 1 (keep-checkpoints)" in said[0]
