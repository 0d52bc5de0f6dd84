"""ServerApp: the server half of ResNet18, MSSplitStrategy, history.csv and final weights."""

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_splitms.config import SplitConfig
from flwr_splitms.data import DatasetUnavailableError
from flwr_splitms.experiment import build_split_model, client_data, evaluation_data
from flwr_splitms.history import save_history
from flwr_splitms.protocol import record_to_state, state_to_record
from flwr_splitms.storage import atomic_write_text, save_checkpoint
from flwr_splitms.strategy import MSSplitStrategy

log = logging.getLogger("flwr")
app = ServerApp()


def output_dir(config: SplitConfig) -> Path:
    """Where results go; a relative path starts at the home folder (apps run elsewhere)."""
    path = Path(config.output_dir).expanduser()
    return path if path.is_absolute() else Path.home() / path


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train, evaluate after every round, and keep history.csv up to date."""
    config = SplitConfig.from_run_config(context.run_config)
    out = output_dir(config)
    try:
        evaluation_set = evaluation_data(config)
        client_data(config, 0, 1)  # fetch the training set once, before the clients ask for it
    except DatasetUnavailableError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    client_net, server_net = build_split_model(config)
    strategy = MSSplitStrategy.from_config(config, server_net)
    atomic_write_text(out / "run.json", json.dumps(config.to_run_config(), indent=2))
    log.info("Writing history.csv and final weights to %s", out)

    def checkpoint(server_round: int, arrays, row) -> None:  # type: ignore[no-untyped-def]
        save_history(strategy.history, out / "history.csv")

    strategy.round_callbacks.append(checkpoint)
    result = strategy.start(
        grid,
        state_to_record(client_net.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.step_timeout,
        evaluate_fn=strategy.central_evaluator(client_net, evaluation_set),
    )
    save_history(result.history, out / "history.csv")
    save_checkpoint(
        out / "final_weights.pt",
        {
            "client": record_to_state(result.arrays),
            "server": strategy.server_model.state_dict(),
            "run_config": config.to_run_config(),
        },
    )
    log.info("Done: %s", out / "history.csv")
