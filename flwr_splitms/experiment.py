"""The pieces of a run built from a :class:`SplitConfig`: split networks and data.

The example Flower app and the local engine build their models and data here, so a run-config
means the same thing in ``flwr run``, in a notebook and in a test.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from flwr_splitms.capacity import (
    MemoryEstimate,
    RunShape,
    estimate_memory,
    measure_footprint,
)
from flwr_splitms.config import SplitConfig
from flwr_splitms.data import (
    BatchSource,
    DataSplit,
    dataset_num_classes,
    load_dataset,
    load_labels,
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
    """Training examples of each client partition, as ``client_data`` will create them.

    Needs only the labels: for the synthetic set no image is generated (the ServerApp's memory
    does not grow with the data that its clients hold).
    """
    labels = load_labels(config.dataset, train=True, seed=config.seed, **_data_kwargs(config))  # type: ignore[arg-type]
    parts = partition(labels, num_partitions, config.partition, config.dirichlet_alpha, config.seed)
    return [len(p) for p in parts]


def memory_estimate(
    config: SplitConfig,
    client_net: nn.Module,
    server_net: nn.Module,
    test_data: BatchSource,
    *,
    registered: int,
    sampled: int,
    train_size: int,
    client_processes: int,
    cache_bytes: int,
    clients_here: bool = True,
) -> MemoryEstimate:
    """What a run of ``config`` allocates (see :mod:`flwr_splitms.capacity`), measured on two
    samples of ``test_data`` through both halves; ``train_size`` training examples are split
    among the ``registered`` nodes.

    ``clients_here``: the ClientApps run on this machine (Flower's simulation engine); False
    for a deployment, where only the server parts count.
    """
    sample, _ = test_data.batch(torch.arange(min(2, len(test_data))))
    if sample.shape[0] < 2:
        sample = sample.repeat(2, *([1] * (sample.dim() - 1)))
    device = next(client_net.parameters()).device
    client, cut = measure_footprint(client_net, sample.to(device))
    server_device = next(server_net.parameters()).device
    server, _ = measure_footprint(server_net, cut.to(server_device))
    stored_per_sample = sample[0].numel()  # images are kept as uint8, one byte per value
    shape = RunShape(
        registered=registered,
        sampled=sampled,
        batch_size=config.batch_size,
        steps_per_message=config.steps_per_message,
        eval_batch_size=config.eval_batch_size,
        client_processes=client_processes,
        cache_bytes=cache_bytes,
        partition_bytes=math.ceil(train_size / max(registered, 1)) * stored_per_sample,
    )
    estimate = estimate_memory(client, server, shape)
    if not clients_here:
        for part in ("client halves", "idle clients", "Flower's nodes"):
            estimate.parts[part] = 0
    return estimate
