"""ClientApp: the client half of ResNet18 and this node's CIFAR partition."""

from flwr.app import Context
from torch import nn

from flwr_splitms.client import make_client_app
from flwr_splitms.config import SplitConfig
from flwr_splitms.data import BatchSource
from flwr_splitms.experiment import build_split_model, client_data


def client_model(context: Context) -> nn.Module:
    """The client-side network (its weights arrive from the server every round)."""
    client_net, _ = build_split_model(SplitConfig.from_run_config(context.run_config))
    return client_net


def node_data(context: Context) -> tuple[BatchSource, BatchSource | None]:
    """This node's partition of the training set (and an optional local test split)."""
    config = SplitConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return client_data(config, partition_id, num_partitions)


app = make_client_app(client_model, node_data)
