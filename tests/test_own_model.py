"""Bring your own model and data: a network and a Dataset the project has never seen.

Written as a user would: a small conv net of their own (with BatchNorm on the client side),
split with ``split_sequential``; a torchvision ``FakeData`` set with random crop, flip and noise
transforms, adapted with ``from_torch_dataset`` and partitioned per client. It is trained with
MS by the local engine, by the ClientApp + strategy on the in-process grid (a fresh ClientApp per
message, so every forward pass is recomputed, augmentation included) and by Flower's simulation
engine; the runs must agree as ``test_equivalence`` requires of the paper's models.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import tomllib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from inprocess_grid import InProcessGrid
from test_activation_shapes import FreshAppPerMessage
from test_equivalence import assert_same_run, assert_same_state
from torch import nn
from torchvision import transforms as T
from torchvision.datasets import FakeData

from flwr_splitms import protocol as P
from flwr_splitms.client import make_client_app
from flwr_splitms.config import SplitConfig
from flwr_splitms.data import BatchSource, DataSplit, from_torch_dataset, partition
from flwr_splitms.local import LocalResult, run_local
from flwr_splitms.models import split_sequential
from flwr_splitms.strategy import MSSplitStrategy

NUM_CLIENTS, NUM_CLASSES, SIDE = 2, 4, 12
TABULAR_APP = Path(__file__).parents[1] / "examples" / "tabular_mlp"
APP_RESULT = re.compile(
    r"tabular_mlp: test accuracy ([\d.]+) after (\d+) rounds; uplink (\d+) bytes \(raw (\d+)\)"
)


class Speckle:
    """A user's own random transform, drawing from NumPy's global RNG."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        noise = np.random.normal(0.0, 0.05, size=tuple(image.shape)).astype(np.float32)
        return image + torch.from_numpy(noise)


def my_model() -> nn.Sequential:
    """The user's network: named stages, cut after ``pool1`` (8 x 6 x 6 activations)."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, NUM_CLASSES),
        )
    )


def my_nets() -> tuple[nn.Module, nn.Module]:
    client_net, server_net = split_sequential(my_model(), at="pool1")
    return client_net, server_net


def my_dataset(train: bool) -> FakeData:
    """Random images; training draws a random crop, flip and speckle noise per sample."""
    augment = [T.RandomCrop(SIDE, padding=2), T.RandomHorizontalFlip()] if train else []
    return FakeData(
        size=48 if train else 16,
        image_size=(3, SIDE, SIDE),
        num_classes=NUM_CLASSES,
        transform=T.Compose([*augment, T.ToTensor(), *([Speckle()] if train else [])]),
        random_offset=0 if train else 10_000,
    )


def my_client_data(partition_id: int, num_partitions: int) -> BatchSource:
    source = from_torch_dataset(my_dataset(train=True), num_classes=NUM_CLASSES)
    parts = partition(source.labels, num_partitions, seed=0)
    return DataSplit(source, torch.from_numpy(parts[partition_id]))


def my_client_app() -> ClientApp:
    def model_fn(context: Context) -> nn.Module:
        return my_nets()[0]

    def data_fn(context: Context) -> tuple[BatchSource, BatchSource | None]:
        node = context.node_config
        return my_client_data(int(node["partition-id"]), int(node["num-partitions"])), None

    return make_client_app(model_fn, data_fn, device="cpu")


def local_run(config: SplitConfig, evaluate: bool) -> LocalResult:
    return run_local(
        config,
        NUM_CLIENTS,
        evaluate=evaluate,
        models=my_nets(),
        client_data=[my_client_data(c, NUM_CLIENTS) for c in range(NUM_CLIENTS)],
        test_data=from_torch_dataset(my_dataset(train=False)) if evaluate else None,
    )


@pytest.fixture
def config() -> SplitConfig:
    return SplitConfig(
        codec="ms",
        codec_ratio=0.9,
        batch_size=4,
        steps_per_round=3,
        num_server_rounds=2,
        eval_batch_size=8,
        lr=0.05,
        seed=5,
        device="cpu",
    )


def test_the_transforms_are_random_and_replay() -> None:
    """The premise: batches differ per generator, and the same generator state replays."""
    source = from_torch_dataset(my_dataset(train=True))
    indices = torch.arange(8)
    first, _ = source.batch(indices, generator=torch.Generator().manual_seed(1))
    again, _ = source.batch(indices, generator=torch.Generator().manual_seed(1))
    other, _ = source.batch(indices, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_own_model_messages_equal_local_engine(config: SplitConfig) -> None:
    """Bit for bit: weights, losses, bytes, errors and the central test scores."""
    local = local_run(config, evaluate=True)
    client_net, server_net = my_nets()
    strategy = MSSplitStrategy.from_config(config, server_net)
    grid = InProcessGrid(FreshAppPerMessage(my_client_app), NUM_CLIENTS)  # type: ignore[arg-type]
    result = strategy.start(
        grid,
        P.state_to_record(client_net.state_dict()),
        num_rounds=config.num_server_rounds,
        evaluate_fn=strategy.central_evaluator(
            my_nets()[0], from_torch_dataset(my_dataset(train=False))
        ),
    )
    assert_same_run(result, strategy, local)
    for column in ("test_loss", "test_accuracy"):
        assert result.history[column].tolist() == local.history[column].tolist(), column
    assert local.history["compression_error"].notna().all()  # MS really compressed


def test_own_model_flower_simulation_equals_local_engine(config: SplitConfig) -> None:
    """Two rounds through Flower's simulation engine (Ray, 2 SuperNodes) against the local
    engine, within float tolerance as in ``test_equivalence``."""
    out: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        client_net, server_net = my_nets()
        strategy = MSSplitStrategy.from_config(config, server_net)
        out["result"] = strategy.start(
            grid,
            P.state_to_record(client_net.state_dict()),
            num_rounds=config.num_server_rounds,
            timeout=300,
        )
        out["server"] = strategy.server_model.state_dict()

    run_simulation(
        server_app=server,
        client_app=my_client_app(),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    local = local_run(config, evaluate=False)
    result = out["result"]
    assert_same_state(P.record_to_state(result.arrays), local.client_weights, atol=1e-5)
    assert_same_state(out["server"], local.server_weights, atol=1e-5)
    assert result.history["train_loss"].tolist() == pytest.approx(
        local.history["train_loss"].tolist(), rel=1e-5
    )
    assert result.history["uplink_bytes"].tolist() == local.history["uplink_bytes"].tolist()


class Messages(logging.Handler):
    """Collects the messages logged to a logger."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tabular_example_app_trains_in_process() -> None:
    """examples/tabular_mlp with its own run-config, on the in-process grid: it learns the
    generated table (3 classes) and MS sends a fraction of the raw activations."""
    config = tomllib.loads((TABULAR_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    run_config = {**config["config"], "num-server-rounds": 2}
    sys.path.insert(0, str(TABULAR_APP))
    try:
        server_app = importlib.import_module(config["components"]["serverapp"].split(":")[0])
        client_app = importlib.import_module(config["components"]["clientapp"].split(":")[0])
    finally:
        sys.path.remove(str(TABULAR_APP))
    log = Messages()
    logging.getLogger("flwr").addHandler(log)
    try:
        grid = InProcessGrid(client_app.app, NUM_CLIENTS, run_config)
        context = Context(
            run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        server_app.main(grid, context)
    finally:
        logging.getLogger("flwr").removeHandler(log)
    done = [m for m in map(APP_RESULT.search, log.messages) if m]
    assert done, "the app did not log its result line"
    accuracy, rounds, sent, raw = (float(g) for g in done[-1].groups())
    assert rounds == 2 and accuracy > 0.6  # chance is 1/3
    assert 0 < sent < raw / 4
