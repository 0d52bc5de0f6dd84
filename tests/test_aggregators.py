"""Any Flower strategy aggregates the client halves: the weights after a round are its aggregate."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    QFedAvg,
    Strategy,
)
from flwr.simulation import run_simulation
from inprocess_grid import InProcessGrid
from split_app import client_app, strategy

from flwr_splitms.aggregators import aggregator_from_name, check_aggregator
from flwr_splitms.config import AGGREGATORS as CONFIG_AGGREGATORS
from flwr_splitms.config import ConfigError, SplitConfig
from flwr_splitms.local import run_local
from flwr_splitms.protocol import state_to_record
from flwr_splitms.strategy import MSSplitStrategy

AGGREGATORS: dict[str, Callable[[], Strategy]] = {
    "fedavg": FedAvg,
    "fedmedian": FedMedian,
    "fedadam": lambda: FedAdam(eta=0.05, tau=1e-3),
}


def spy_on_replies(strat: MSSplitStrategy) -> list[list[Message]]:
    """Record the round-end replies that reach ``aggregate_train``."""
    seen: list[list[Message]] = []
    original = strat.aggregate_train

    def aggregate_train(server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        seen.append(copy.deepcopy(replies))  # FedMedian pops the arrays out of the replies
        return original(server_round, replies)

    strat.aggregate_train = aggregate_train  # type: ignore[method-assign]
    return seen


def expected_aggregate(name: str, initial: ArrayRecord, replies: list[Message]) -> ArrayRecord:
    """What a fresh instance of the Flower strategy makes of the same replies."""
    reference = AGGREGATORS[name]()
    if isinstance(reference, FedAdam):
        reference.current_arrays = {k: a.numpy() for k, a in initial.items()}
    arrays, _ = reference.aggregate_train(1, copy.deepcopy(replies))
    assert arrays is not None
    return arrays


def assert_same_arrays(got: ArrayRecord, expected: ArrayRecord) -> None:
    assert list(got) == list(expected)
    for key in got:
        a, b = got[key].numpy(), expected[key].numpy()
        if np.issubdtype(a.dtype, np.integer):
            np.testing.assert_array_equal(a, np.rint(b).astype(a.dtype), err_msg=key)
        else:
            np.testing.assert_allclose(a, b.astype(a.dtype), rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_weights_are_the_aggregators_own_on_the_in_process_grid(
    tiny_config: SplitConfig, name: str
) -> None:
    config = tiny_config.replace(num_server_rounds=1)
    grid = InProcessGrid(client_app(), 3, config.to_run_config())
    client_net, strat = strategy(config, aggregator=AGGREGATORS[name]())
    seen = spy_on_replies(strat)
    initial = state_to_record(client_net.state_dict())
    result = strat.start(grid, initial, num_rounds=1, timeout=60)
    assert len(seen) == 1 and len(seen[0]) == 3
    assert_same_arrays(result.arrays, expected_aggregate(name, initial, seen[0]))
    plain = expected_aggregate("fedavg", initial, seen[0])
    differs = any(
        not np.allclose(result.arrays[k].numpy(), plain[k].numpy()) for k in result.arrays
    )
    assert differs == (name != "fedavg")  # the aggregator did the work, not a FedAvg behind it


@pytest.mark.parametrize("name", ["fedmedian", "fedadam"])
def test_weights_are_the_aggregators_own_in_flowers_simulation(
    tiny_config: SplitConfig, name: str
) -> None:
    config = tiny_config.replace(num_server_rounds=1, codec="none")
    out: dict[str, object] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        client_net, strat = strategy(config, aggregator=AGGREGATORS[name]())
        out["seen"] = spy_on_replies(strat)
        out["initial"] = initial = state_to_record(client_net.state_dict())
        out["result"] = strat.start(grid, initial, num_rounds=1, timeout=300)

    run_simulation(
        server_app=server,
        client_app=client_app(config),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    seen = out["seen"]
    assert len(seen) == 1 and len(seen[0]) == 3  # type: ignore[arg-type]
    expected = expected_aggregate(name, out["initial"], seen[0])  # type: ignore[arg-type, index]
    assert_same_arrays(out["result"].arrays, expected)  # type: ignore[attr-defined]


def test_a_server_side_dp_wrapper_runs_and_changes_the_weights(tiny_config: SplitConfig) -> None:
    config = tiny_config.replace(num_server_rounds=1)
    grid = InProcessGrid(client_app(), 2, config.to_run_config())
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.5, clipping_norm=1.0, num_sampled_clients=2
    )
    client_net, strat = strategy(config, aggregator=dp)
    initial = state_to_record(client_net.state_dict())
    plain = None

    original = strat.aggregate_train

    def aggregate_train(server_round, replies):  # type: ignore[no-untyped-def]
        nonlocal plain
        replies = list(replies)
        plain, _ = FedAvg().aggregate_train(server_round, replies)  # before DP clips in place
        return original(server_round, replies)

    strat.aggregate_train = aggregate_train  # type: ignore[method-assign]
    result = strat.start(grid, initial, num_rounds=1, timeout=60)
    assert plain is not None and result.history["steps"].iloc[0] == config.steps_per_round
    assert any(
        not np.allclose(result.arrays[k].numpy(), plain[k].numpy())
        for k in result.arrays
        if np.issubdtype(result.arrays[k].numpy().dtype, np.floating)
    )
    for key in result.arrays:  # the clients' dtypes are kept
        assert result.arrays[key].numpy().dtype == initial[key].numpy().dtype


@pytest.mark.parametrize(
    "aggregator",
    [
        FedProx(proximal_mu=0.1),
        QFedAvg(client_learning_rate=0.1),
        DifferentialPrivacyClientSideFixedClipping(
            FedAvg(), noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=2
        ),
        DifferentialPrivacyServerSideFixedClipping(
            FedProx(proximal_mu=0.1), noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=2
        ),
    ],
    ids=["fedprox", "qfedavg", "dp-client-side", "dp-around-fedprox"],
)
def test_aggregators_that_need_the_client_are_refused(
    tiny_config: SplitConfig, aggregator: Strategy
) -> None:
    with pytest.raises(ValueError, match="which the split client does not do"):
        strategy(tiny_config, aggregator=aggregator)


def test_aggregators_by_name() -> None:
    assert isinstance(aggregator_from_name("FedMedian"), FedMedian)
    assert aggregator_from_name("fedadam", eta=0.01).eta == 0.01
    with pytest.raises(ValueError, match="unknown aggregator 'fedsgd'; choose one of fedavg"):
        aggregator_from_name("fedsgd")


def test_the_run_config_key_names_the_aggregator(
    tiny_config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    # aggregator = "fedmedian" in the example's run-config: FedMedian, with the sampling options
    config = SplitConfig.from_run_config(
        {**tiny_config.to_run_config(), "aggregator": "fedmedian", "num-server-rounds": 1}
    )
    grid = InProcessGrid(client_app(), 3, config.to_run_config())
    client_net, strat = strategy(config)
    assert type(strat.aggregator) is FedMedian
    assert strat.aggregator.min_train_nodes == strat.min_train_nodes
    assert strat.aggregator.fraction_train == strat.fraction_train
    with caplog.at_level(logging.INFO, logger="flwr"):
        strat.summary()
    assert "Aggregator: FedMedian" in caplog.text  # the run's log says which one
    seen = spy_on_replies(strat)
    initial = state_to_record(client_net.state_dict())
    result = strat.start(grid, initial, num_rounds=1, timeout=60)
    assert_same_arrays(result.arrays, expected_aggregate("fedmedian", initial, seen[0]))
    # the default builds the same FedAvg as before; a name is checked like every other key
    assert type(strategy(tiny_config)[1].aggregator) is FedAvg
    with pytest.raises(ConfigError, match=r'unknown aggregator.*mean aggregator="fedmedian"'):
        SplitConfig.from_run_config({"aggregator": "fedmedain"})


def test_every_aggregator_name_builds_its_flower_strategy() -> None:
    for name, class_name in CONFIG_AGGREGATORS.items():
        built = aggregator_from_name(name, fraction_train=0.5, min_train_nodes=2)
        assert type(built).__name__ == class_name and built.fraction_train == 0.5
        assert check_aggregator(built) is built


def test_the_local_engine_refuses_another_aggregator(tiny_config: SplitConfig) -> None:
    with pytest.raises(ValueError, match="aggregator='krum': the local engine averages with"):
        run_local(tiny_config.replace(aggregator="krum"), 2)
