import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms import protocol as P
from flwr_splitms.aggregators import cast_like
from flwr_splitms.config import SplitConfig
from flwr_splitms.core import lr_at_round, server_step
from flwr_splitms.experiment import evaluation_data
from flwr_splitms.history import HISTORY_COLUMNS
from flwr_splitms.strategy import MSSplitStrategy, SplitResult


def run(
    config: SplitConfig, grid: InProcessGrid, timeout: float = 60, **kwargs
) -> tuple[SplitResult, MSSplitStrategy]:  # type: ignore[no-untyped-def]
    client_net, strat = strategy(config, **kwargs)
    result = strat.start(
        grid,
        P.state_to_record(client_net.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=timeout,
        evaluate_fn=strat.central_evaluator(client_net, evaluation_data(config)),
    )
    return result, strat


def test_lr_schedules() -> None:
    assert lr_at_round(0.1, "constant", 7, 10) == 0.1
    assert lr_at_round(0.1, "cosine", 1, 10) == pytest.approx(0.1)
    assert lr_at_round(0.1, "cosine", 6, 10) == pytest.approx(0.05)
    assert lr_at_round(0.1, "step", 6, 10) == pytest.approx(0.01)
    assert lr_at_round(0.1, "step", 9, 10) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at_round(0.1, "linear", 1, 2)


def test_server_step_loss_is_the_mean_of_client_means() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    acts = [torch.randn(2, 6), torch.randn(4, 6)]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 2, 1, 0])]
    outcome = server_step(net, opt, acts, labels)
    per_client = [
        torch.nn.functional.cross_entropy(net(a), y).item()
        for a, y in zip(acts, labels, strict=True)
    ]
    assert outcome.loss == pytest.approx(np.mean(per_client), rel=1e-6)
    assert outcome.client_losses == pytest.approx(per_client, rel=1e-6)
    # Each client gets the gradient of its own mean loss.
    x = acts[1].clone()
    x.requires_grad_(True)
    torch.nn.functional.cross_entropy(net(x), labels[1]).backward()
    assert torch.allclose(outcome.gradients[1], x.grad, atol=1e-6)


def test_cast_like_restores_dtypes() -> None:
    reference = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(3))})
    averaged = ArrayRecord({"w": Array(np.ones(2, np.float64)), "n": Array(np.array(2.9999))})
    out = cast_like(averaged, reference)
    assert out["w"].numpy().dtype == np.float32 and int(out["n"].numpy()) == 3


def test_bad_codec_fails_at_construction() -> None:
    with pytest.raises(ValueError):
        MSSplitStrategy(torch.nn.Linear(2, 2), codec="ms", codec_params={"ratio": 1.5})


def test_rounds_produce_history_and_weights(tiny_config: SplitConfig) -> None:
    grid = InProcessGrid(client_app(), 3, tiny_config.to_run_config())
    result, strat = run(tiny_config, grid)
    history = result.history
    assert isinstance(history, pd.DataFrame) and list(history["round"]) == [1, 2]
    assert set(HISTORY_COLUMNS) <= set(history.columns)
    assert (history["num_clients"] == 3).all() and (history["steps"] == 2).all()
    raw = 3 * 2 * 4 * 64 * 32 * 32 * 4  # clients x steps x batch x activation bytes
    assert (history["uplink_raw_bytes"] == raw).all()
    # Raw float32 gradients (grad-codec none) plus one payload header per gradient.
    assert (history["downlink_bytes"] > raw).all() and (
        history["downlink_bytes"] < 1.01 * raw
    ).all()
    assert (history["total_bytes"] == history["uplink_bytes"] + history["downlink_bytes"]).all()
    assert (raw / history["uplink_bytes"] > 12).all()  # MS 0.99/2 bits: ~13.8x fewer bytes
    assert history["test_accuracy"].between(0, 1).all() and history["train_loss"].notna().all()
    assert 0 < history["compression_error"].iloc[0] < 1
    assert set(result.evaluate_metrics_serverapp) == {0, 1, 2}
    # One begin, one step and one end message per client and round: one round trip per step.
    kinds = pd.Series(grid.message_types).value_counts()
    assert kinds[P.SPLIT_BEGIN] == kinds[P.SPLIT_STEP] == kinds[P.SPLIT_END] == 6
    assert strat.history.equals(history)


def test_failing_node_is_dropped_and_the_round_goes_on(
    tiny_config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config.replace(num_server_rounds=1)
    grid = InProcessGrid(client_app(), 3, config.to_run_config())
    grid.fail_after[1001] = 1  # answers split_begin, then fails
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result, _ = run(config, grid)
    assert "Node 1001 failed" in caplog.text
    assert result.history["steps"].iloc[0] == 2 and result.train_metrics_clientapp
    assert len(result.arrays) > 0


def test_silent_node_times_out_and_is_dropped(
    tiny_config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config.replace(num_server_rounds=1, steps_per_round=1)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    grid.silent_after[1000] = 1
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result, _ = run(config, grid, timeout=2)
    assert "Node 1000 did not answer" in caplog.text
    assert result.train_metrics_clientapp  # FedAvg over the node that answered


def test_round_without_any_client_keeps_the_weights(tiny_config: SplitConfig) -> None:
    config = tiny_config.replace(num_server_rounds=1)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    grid.silent_after.update({1000: 0, 1001: 0})
    client_net, strat = strategy(config)
    initial = P.state_to_record(client_net.state_dict())
    result = strat.start(grid, initial, num_rounds=1, timeout=0.5)
    assert result.arrays is initial and result.history["num_clients"].iloc[0] == 0


def test_every_client_failing_the_same_way_stops_the_run(
    tiny_config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """batch-size above every partition: one clear error instead of skipped rounds of NaN."""
    from flwr_splitms.transport import ClientsFailedError

    config = tiny_config.replace(batch_size=40, num_server_rounds=3)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    client_net, strat = strategy(config)
    with (
        caplog.at_level(logging.ERROR, logger="flwr"),
        pytest.raises(
            ClientsFailedError, match=r"all 2 clients failed the same way.*batch-size 40"
        ),
    ):
        strat.start(grid, P.state_to_record(client_net.state_dict()), num_rounds=3)
    assert caplog.text.count("Traceback") <= 1  # one traceback per distinct error, not per client
    assert grid.message_types == [P.SPLIT_BEGIN, P.SPLIT_BEGIN]


def test_federated_evaluation_scores_local_test_splits(tiny_config: SplitConfig) -> None:
    config = tiny_config.replace(
        num_server_rounds=1, local_test_fraction=0.25, fraction_evaluate=1.0
    )
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    result, _ = run(config, grid)
    fed = result.evaluate_metrics_clientapp[1]
    assert fed["num-examples"] > 0 and 0 <= fed["accuracy"] <= 1 and math.isfinite(fed["loss"])
    assert "fed_test_accuracy" in result.history.columns


def test_keyword_defaults_equal_the_run_config_defaults() -> None:
    import inspect

    defaults = SplitConfig()
    for name, parameter in inspect.signature(MSSplitStrategy.__init__).parameters.items():
        if name.endswith("codec_params") or name == "num_classes":
            # None = derived (codec defaults; the model's classes), as unset/0 in the config
            assert parameter.default is None
        elif hasattr(defaults, name) and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == getattr(defaults, name), name


def test_the_adaptive_wait_takes_its_run_config_keys() -> None:
    config = SplitConfig(wait_factor=2.0, wait_floor=1.5, step_timeout=30.0)
    strat = MSSplitStrategy.from_config(config, torch.nn.Linear(2, 2))
    assert (strat.wait.factor, strat.wait.floor) == (2.0, 1.5)
    for seconds in (1.0, 3.0, 2.0):  # the slowest reply of three exchanges
        strat.wait.observe(seconds)
    assert strat.wait.budget() == 6.0  # 2 x the slowest 3 s, above the 1.5 s floor
    strat.wait.floor = 7.0
    assert strat.wait.budget() == 7.0


def test_fedavg_options_are_used_or_refused(tiny_config: SplitConfig) -> None:
    """train_config reaches the clients; renamed record keys and metric aggregation work."""
    from flwr.app import ConfigRecord, MetricRecord

    with pytest.raises(ValueError, match="weighted_by_key"):
        MSSplitStrategy(torch.nn.Linear(2, 2), weighted_by_key="n")
    config = tiny_config.replace(
        num_server_rounds=1, local_test_fraction=0.25, fraction_evaluate=1.0
    )
    calls: list[int] = []

    def aggregate(records, key):  # type: ignore[no-untyped-def]
        calls.append(len(records))
        return MetricRecord({"accuracy": 0.5, "loss": 1.0})

    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    client_net, strat = strategy(
        config,
        arrayrecord_key="weights",
        configrecord_key="settings",
        evaluate_metrics_aggr_fn=aggregate,
    )
    result = strat.start(
        grid,
        P.state_to_record(client_net.state_dict()),
        num_rounds=1,
        train_config=ConfigRecord({"my-key": 7}),
    )
    assert all(
        c.get("my-key") == 7
        for c, t in zip(grid.configs, grid.message_types, strict=True)
        if t.startswith("train")
    )
    assert result.train_metrics_clientapp and calls == [2]
    assert result.evaluate_metrics_clientapp[1]["accuracy"] == 0.5
    with pytest.raises(ValueError, match="reserved by the split protocol"):
        strat.start(grid, result.arrays, num_rounds=1, train_config=ConfigRecord({"lr": 1.0}))


def test_steps_per_message_groups_steps_into_round_trips(tiny_config: SplitConfig) -> None:
    config = tiny_config.replace(num_server_rounds=1, steps_per_round=5, steps_per_message=2)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    result, _ = run(config, grid)
    kinds = pd.Series(grid.message_types).value_counts()
    # Blocks of 2, 2, 1 steps: per client one begin, two step messages and one end.
    assert kinds[P.SPLIT_BEGIN] == kinds[P.SPLIT_END] == 2 and kinds[P.SPLIT_STEP] == 4
    assert result.history["steps"].iloc[0] == 5


def test_dead_node_is_dropped_after_seconds_not_the_timeout(
    tiny_config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    config = tiny_config.replace(num_server_rounds=1, steps_per_round=6)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    grid.silent_after[1001] = 4  # vanishes mid-round
    client_net, strat = strategy(config, wait_floor=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = strat.start(
            grid, P.state_to_record(client_net.state_dict()), num_rounds=1, timeout=600
        )
    assert time.monotonic() - started < 60
    assert "Node 1001 did not answer" in caplog.text
    assert result.history["steps"].iloc[0] == 6 and result.train_metrics_clientapp


def test_too_few_nodes_stop_with_a_clear_error(tiny_config: SplitConfig) -> None:
    from flwr_splitms.transport import NotEnoughNodesError

    grid = InProcessGrid(client_app(), 1, tiny_config.to_run_config())
    client_net, strat = strategy(tiny_config, node_wait=0.2)
    with pytest.raises(NotEnoughNodesError, match=r"1 node\(s\) connected .* needs 2"):
        strat.start(grid, P.state_to_record(client_net.state_dict()), num_rounds=1)


def test_node_lost_mid_round_rejoins_the_next_round(tiny_config: SplitConfig) -> None:
    """A node that vanishes mid-round costs that round only; it rejoins from the global weights."""
    config = tiny_config.replace(num_server_rounds=2, steps_per_round=3)
    grid = InProcessGrid(client_app(), 3, config.to_run_config())
    grid.silent_messages[1002] = {1}  # drops the first step message of round 1, then is back
    client_net, strat = strategy(config, wait_floor=0.5)
    finished: dict[int, set[int]] = {}  # round -> clients whose weights were averaged
    strat.round_callbacks.append(
        lambda r, arrays, row: finished.update({r: set(strat.run.cursors)})
    )
    result = strat.start(grid, P.state_to_record(client_net.state_dict()), num_rounds=2, timeout=5)
    assert list(result.history["steps"]) == [3, 3]
    # Round 1: FedAvg of the two survivors; round 2: all three again (begin, 2 steps, end).
    assert finished == {1: {0, 1}, 2: {0, 1, 2}}
    assert grid.seen[1002] == 2 + 4
