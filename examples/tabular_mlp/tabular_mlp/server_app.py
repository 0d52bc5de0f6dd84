"""ServerApp: the server half of the MLP, MSSplitStrategy, and a test after every round."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_splitms.codecs import get_codec
from flwr_splitms.data import from_torch_dataset
from flwr_splitms.protocol import state_to_record
from flwr_splitms.strategy import MSSplitStrategy
from tabular_mlp.task import build

log = logging.getLogger("flwr")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train ``num-server-rounds`` rounds; log the test accuracy of the split model."""
    config = context.run_config
    client_net, server_net, _, test = build(config)
    codec = str(config["codec"])
    ratio = {"ratio": float(config["codec-ratio"])}
    strategy = MSSplitStrategy(
        server_net,
        codec=codec,
        codec_params=ratio if "ratio" in get_codec(codec).params else None,
        lr=float(config["lr"]),
        batch_size=int(config["batch-size"]),
        steps_per_round=int(config["steps-per-round"]),
        seed=int(config["seed"]),
        augment=False,  # the rows' jitter is the Dataset's own transform
    )
    result = strategy.start(
        grid,
        state_to_record(client_net.state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        evaluate_fn=strategy.central_evaluator(client_net, from_torch_dataset(test)),
    )
    last = result.history.iloc[-1]
    log.info(
        "tabular_mlp: test accuracy %.3f after %d rounds; uplink %.0f bytes (raw %.0f)",
        last["test_accuracy"],
        len(result.history),
        result.history["uplink_bytes"].sum(),
        result.history["uplink_raw_bytes"].sum(),
    )
