"""The memory estimate: measured footprints, scaling with sampled (not registered) nodes, the
one-line refusal, and the example ServerApp stopping a run that would not fit before training."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from inprocess_grid import InProcessGrid
from split_app import client_app
from torch import nn

from flwr_splitms import capacity
from flwr_splitms.capacity import (
    FLOWER_NODE_BYTES,
    Footprint,
    InsufficientMemoryError,
    RunShape,
    check_memory,
    estimate_memory,
    measure_footprint,
)
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model, evaluation_data, memory_estimate

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "cifar100_resnet18"))
from cifar100_resnet18 import server_app

CLIENT = Footprint(params=300_000, saved_per_sample=1_500_000, largest_per_sample=262_144,
                   out_per_sample=262_144)  # fmt: skip
SERVER = Footprint(params=45_000_000, saved_per_sample=3_300_000, largest_per_sample=262_144,
                   out_per_sample=400)  # fmt: skip


def test_footprint_counts_what_autograd_saves() -> None:
    """Two Linear layers with a ReLU: the saved tensors are known exactly."""
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    footprint, out = measure_footprint(net, torch.randn(4, 10))
    # Linear 1 saves its input (10 floats), ReLU its output (20, shared with Linear 2's input)
    assert footprint.saved_per_sample == (10 + 20) * 4
    assert footprint.largest_per_sample == 20 * 4
    assert footprint.out_per_sample == 5 * 4 and out.shape == (4, 5) and not out.requires_grad
    assert footprint.params == (10 * 20 + 20 + 20 * 5 + 5) * 4


def test_footprint_leaves_batchnorm_statistics_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    footprint, _ = measure_footprint(net, torch.randn(2, 3, 8, 8))
    assert footprint.saved_per_sample > 0 and not net.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="at least 2"):
        measure_footprint(net, torch.randn(1, 3, 8, 8))


def test_resnet18_shallow_matches_the_measured_server_growth() -> None:
    """Calibration: the simulation's ServerApp grew 5.9 MB per sample of a sampled client
    (10 -> 40 clients), of which autograd saves 3.3 MB."""
    client_net, server_net = build_split_model(SplitConfig(dataset="synthetic", num_classes=10))
    client, cut = measure_footprint(client_net, torch.randn(2, 3, 32, 32))
    server, _ = measure_footprint(server_net, cut)
    assert 3.0e6 < server.saved_per_sample < 3.6e6
    shape = RunShape(registered=40, sampled=30, batch_size=8)
    per_sample = estimate_memory(client, server, shape).parts["server step"] / (30 * 8)
    assert 5.4e6 < per_sample < 6.4e6
    assert client.out_per_sample == 64 * 32 * 32 * 4


def test_memory_grows_with_sampled_not_registered_nodes() -> None:
    def total(registered: int, sampled: int) -> int:
        shape = RunShape(registered, sampled, batch_size=8, client_processes=2,
                         partition_bytes=64 * 3072)  # fmt: skip
        return estimate_memory(CLIENT, SERVER, shape).total

    ten = total(10, 10)
    # 990 more idle nodes cost at most the two processes' caches plus Flower's node records
    assert total(1000, 10) - ten <= 2 * capacity.CLIENT_CACHE_BYTES + 990 * FLOWER_NODE_BYTES
    few = estimate_memory(CLIENT, SERVER, RunShape(1000, 10, batch_size=8)).parts
    many = estimate_memory(CLIENT, SERVER, RunShape(1000, 1000, batch_size=8)).parts
    for part in ("server step", "client halves"):  # proportional to the sampled nodes
        assert many[part] == 100 * few[part]
    parts = estimate_memory(CLIENT, SERVER, RunShape(100, 10, batch_size=8)).parts
    per_sample = 3 * SERVER.saved_per_sample // 2 + 4 * CLIENT.out_per_sample
    assert parts["server step"] == 10 * 8 * per_sample
    assert parts["Flower's nodes"] == 100 * FLOWER_NODE_BYTES


def test_refusal_is_one_line_with_the_numbers_and_the_fix() -> None:
    estimate = estimate_memory(CLIENT, SERVER, RunShape(1000, 1000, batch_size=8))
    with pytest.raises(InsufficientMemoryError) as info:
        check_memory(estimate, 16 * 2**30)
    message = str(info.value)
    assert "\n" not in message
    assert "needs about" in message and "16.0 GB available" in message
    assert "server step" in message and "1000 sampled x batch 8" in message
    assert "fraction-train" in message and "min-nodes" in message
    check_memory(estimate, None)  # unknown memory: no refusal
    check_memory(estimate, 10 * estimate.total)
    split = estimate.subset(capacity.SERVER_PARTS)
    rest = estimate.subset(capacity.SERVER_PARTS, keep=False)
    assert split.total + rest.total == estimate.total and "client halves" in rest.parts


def test_experiment_estimate_of_a_config(tiny_config: SplitConfig) -> None:
    client_net, server_net = build_split_model(tiny_config)
    test_data = evaluation_data(tiny_config)

    def estimate(sampled: int, here: bool = True) -> capacity.MemoryEstimate:
        return memory_estimate(
            tiny_config, client_net, server_net, test_data, registered=100, sampled=sampled,
            train_size=6400, client_processes=2, cache_bytes=2**20, clients_here=here,
        )  # fmt: skip

    small, large = estimate(10), estimate(100)
    assert large.parts["server step"] == 10 * small.parts["server step"]
    assert small.parts["idle clients"] <= 2 * 2**20
    deployed = estimate(10, here=False)
    assert deployed.parts["client halves"] == 0 and deployed.parts["idle clients"] == 0
    assert deployed.parts["server step"] == small.parts["server step"]


def test_example_server_app_refuses_a_run_that_does_not_fit(
    tiny_config: SplitConfig,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check runs before training and before the run folder is made: one ERROR line."""
    monkeypatch.setattr(server_app, "available_memory", lambda device="cpu": 2**20)
    config = tiny_config.replace(num_server_rounds=1, node_wait=0.5)
    run_config = config.to_run_config()
    grid = InProcessGrid(client_app(), 2, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="flwr"), pytest.raises(InsufficientMemoryError):
        server_app.main(grid, context)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not enough memory" in errors[0] and "1 MB available" in errors[0]
    assert any("Memory: about" in r.getMessage() for r in caplog.records)
    assert not grid.message_types  # no message was sent
    assert not Path(config.output_dir).expanduser().exists() or not any(
        Path(config.output_dir).expanduser().iterdir()
    )
