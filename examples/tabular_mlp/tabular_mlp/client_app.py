"""ClientApp: the client half of the MLP (its first layer) and this node's share of the rows."""

from flwr.app import Context
from torch import nn

from flwr_splitms.client import make_client_app
from flwr_splitms.data import BatchSource
from tabular_mlp.task import build, client_rows


def client_model(context: Context) -> nn.Module:
    """The client-side network (its weights arrive from the server every round)."""
    return build(context.run_config)[0]


def node_rows(context: Context) -> tuple[BatchSource, BatchSource | None]:
    """This node's training rows; no local test split (the server evaluates)."""
    train = build(context.run_config)[2]
    partition_id = int(context.node_config.get("partition-id", 0))
    num_partitions = int(context.node_config.get("num-partitions", 1))
    return client_rows(train, partition_id, num_partitions, int(context.run_config["seed"])), None


app = make_client_app(client_model, node_rows)
