"""A ClientApp and strategy built from a SplitConfig, as the example app builds them."""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from flwr_splitms.client import make_client_app
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import build_split_model, client_data
from flwr_splitms.strategy import MSSplitStrategy


def client_app(fixed: SplitConfig | None = None) -> ClientApp:
    """Reads the run-config of each node, or ``fixed`` (run_simulation passes no run-config)."""

    def config_of(context: Context) -> SplitConfig:
        return fixed or SplitConfig.from_run_config(context.run_config)

    def model_fn(context: Context):  # type: ignore[no-untyped-def]
        return build_split_model(config_of(context))[0]

    def data_fn(context: Context):  # type: ignore[no-untyped-def]
        config = config_of(context)
        return client_data(
            config,
            int(context.node_config["partition-id"]),
            int(context.node_config["num-partitions"]),
        )

    return make_client_app(model_fn, data_fn)


def strategy(config: SplitConfig, **kwargs):  # type: ignore[no-untyped-def]
    client_net, server_net = build_split_model(config)
    return client_net, MSSplitStrategy.from_config(config, server_net, **kwargs)
