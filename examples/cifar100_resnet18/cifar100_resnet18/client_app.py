"""ClientApp: the client half of ResNet18 and this node's CIFAR partition.

In a deployment every message starts a fresh ``flwr-clientapp`` process that builds the model
and reads the partition again, so both are kept cheap: the network is built on PyTorch's
``meta`` device and only given (uninitialised) memory, because its weights always arrive before
use (from the server at round start, from ``context.state`` within a round); the partition is
read from the on-disk cache.
"""

import torch
from flwr.app import Context
from torch import nn

from flwr_splitms.client import make_client_app
from flwr_splitms.config import SplitConfig
from flwr_splitms.data import BatchSource
from flwr_splitms.experiment import build_split_model, client_data


def client_model(context: Context) -> nn.Module:
    """The client-side network: its architecture only; the weights arrive in messages."""
    with torch.device("meta"):  # skips initialising ~11M server-side parameters per process
        client_net, _ = build_split_model(SplitConfig.from_run_config(context.run_config))
    return client_net.to_empty(device="cpu")


def node_data(context: Context) -> tuple[BatchSource, BatchSource | None]:
    """This node's partition of the training set (and an optional local test split)."""
    config = SplitConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return client_data(config, partition_id, num_partitions)


app = make_client_app(client_model, node_data)
