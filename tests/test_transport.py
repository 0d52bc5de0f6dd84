"""The transport: adaptive wait, the drop policy (never for slowness in simulation), node waits."""

from __future__ import annotations

import logging
import time

import pandas as pd
import pytest
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms import transport as transport_module
from flwr_splitms.config import SplitConfig
from flwr_splitms.protocol import state_to_record
from flwr_splitms.transport import AdaptiveWait, NotEnoughNodesError, Transport, wait_for_nodes


def test_the_wait_follows_the_slowest_recent_replies() -> None:
    wait = AdaptiveWait(100.0, factor=3.0, floor=1.0, warmup=2, window=3)
    assert wait.budget() == 100.0  # until two exchanges were seen: the ceiling
    wait.observe(0.2)
    wait.observe(2.0)  # one reply queued behind other work
    assert wait.budget() == 6.0  # 3 x the slowest, not the median
    for _ in range(3):  # the slow one leaves the window
        wait.observe(0.1)
    assert wait.budget() == 1.0  # the floor
    wait.observe(50.0)
    assert wait.budget() == 100.0  # the ceiling bounds it


class SlowGrid(InProcessGrid):
    """Node 1001's replies only come out of a pull ``delay`` seconds after the push."""

    def __init__(self, *args, delay: float, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.delay, self.pushed_at = delay, 0.0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed_at = time.monotonic()
        return super().push_messages(messages)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        got = list(super().pull_messages(message_ids))
        late = time.monotonic() - self.pushed_at < self.delay
        keep = [m for m in got if not (late and m.metadata.src_node_id == 1001)]
        for m in got:
            if m not in keep:  # hand it out again on a later pull
                self.replies[m.metadata.reply_to_message_id] = m
        return keep


def run_slow(
    tiny_config: SplitConfig,
    *,
    simulation: bool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> pd.Series:
    """One round of 2 steps in which node 1001 answers late; its history row (logs in caplog)."""
    monkeypatch.setattr(transport_module, "is_simulation_grid", lambda grid: simulation)
    config = tiny_config.replace(num_server_rounds=1, steps_per_round=2)
    grid = SlowGrid(client_app(), 2, config.to_run_config(), delay=1.5)
    client_net, strat = strategy(config, wait_floor=0.3, wait_factor=1.0)
    strat.wait.warmup = 0  # the adaptive wait applies from the first exchange
    strat.wait.observe(0.05)
    initial = state_to_record(client_net.state_dict())
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = strat.start(grid, initial, num_rounds=1, timeout=30)
    return result.history.iloc[0]


def test_a_slow_node_is_never_dropped_in_simulation(
    tiny_config: SplitConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    row = run_slow(tiny_config, simulation=True, monkeypatch=monkeypatch, caplog=caplog)
    assert (row["num_clients"], row["dropped_clients"], row["steps"]) == (2, 0, 2)
    assert "dropped" not in caplog.text


def test_a_deployment_drops_a_stalled_node_and_records_it(
    tiny_config: SplitConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    row = run_slow(tiny_config, simulation=False, monkeypatch=monkeypatch, caplog=caplog)
    assert (row["num_clients"], row["dropped_clients"]) == (2, 1)
    assert "Node 1001 did not answer within 0.3s; dropped from the round" in caplog.text
    assert "2 clients (1 dropped)" in caplog.text  # the round's log line says so


def test_the_simulation_grid_is_recognised() -> None:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from flwr_splitms.flower_internals import is_simulation_grid

    assert is_simulation_grid(InMemoryGrid.__new__(InMemoryGrid))
    assert not is_simulation_grid(InProcessGrid.__new__(InProcessGrid))
    assert Transport(InProcessGrid.__new__(InProcessGrid), AdaptiveWait(1.0)).drop_slow


def test_waiting_for_nodes_reports_and_then_says_the_fix(
    tiny_config: SplitConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(transport_module, "NODE_WAIT_REPORT", 0.5)
    grid = InProcessGrid(client_app(), 1, tiny_config.to_run_config())
    with (
        caplog.at_level(logging.INFO, logger="flwr"),
        pytest.raises(
            NotEnoughNodesError,
            match=r"1 node\(s\) connected after waiting 1.2s, the run needs 2.*Fix",
        ),
    ):
        wait_for_nodes(grid, 2, 1.2)
    lines = [r.getMessage() for r in caplog.records if "waiting for nodes" in r.getMessage()]
    assert len(lines) >= 2 and lines[0].startswith("waiting for nodes: 1/2 connected, 1 s left")
    assert wait_for_nodes(grid, 1, 0.0) == 1
