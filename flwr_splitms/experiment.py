"""The pieces of a run built from a :class:`SplitConfig`: split networks and data.

The example Flower app and the local engine build their models and data here, so a run-config
means the same thing in ``flwr run``, in a notebook and in a test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flwr_splitms.config import SplitConfig
from flwr_splitms.data import (
    BatchSource,
    DataSplit,
    dataset_num_classes,
    load_dataset,
    load_partition,
    partition,
)
from flwr_splitms.models import split_model


def num_classes(config: SplitConfig) -> int:
    """Classes of the configured dataset (``num-classes`` overrides, 0 = the dataset's own)."""
    return dataset_num_classes(config.dataset, config.num_classes or None)


def build_split_model(config: SplitConfig) -> tuple[nn.Module, nn.Module]:
    """Client and server networks, initialised from ``seed`` (same weights everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return split_model(config.arch, config.cut, num_classes(config))


def _data_kwargs(config: SplitConfig) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "root": Path(config.data_root).expanduser(),
        "download": config.data_download,
    }
    if config.dataset == "synthetic":
        kwargs.update(num_classes=num_classes(config), size=config.synthetic_size)
    return kwargs


def client_data(
    config: SplitConfig, partition_id: int, num_partitions: int
) -> tuple[DataSplit, DataSplit | None]:
    """One client's training split and optional local test split."""
    return load_partition(
        config.dataset,
        partition_id,
        num_partitions,
        scheme=config.partition,
        alpha=config.dirichlet_alpha,
        seed=config.seed,
        test_fraction=config.local_test_fraction,
        **_data_kwargs(config),  # type: ignore[arg-type]
    )


def evaluation_data(config: SplitConfig) -> BatchSource:
    """The held-out test set for centralized evaluation on the server."""
    kwargs = _data_kwargs(config)
    if config.dataset == "synthetic":
        kwargs["size"] = max(config.synthetic_size // 5, 1)
    return load_dataset(config.dataset, train=False, seed=config.seed, **kwargs)  # type: ignore[arg-type]


def partition_sizes(config: SplitConfig, num_partitions: int) -> list[int]:
    """Training examples of each client partition, as ``client_data`` will create them."""
    train = load_dataset(config.dataset, train=True, seed=config.seed, **_data_kwargs(config))  # type: ignore[arg-type]
    parts = partition(
        train.labels, num_partitions, config.partition, config.dirichlet_alpha, config.seed
    )
    return [len(p) for p in parts]
