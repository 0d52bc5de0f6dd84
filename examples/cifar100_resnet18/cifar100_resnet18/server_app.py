"""ServerApp: checks the run-config, then trains the server half of ResNet18 with MSSplitStrategy.

Results go to a fresh folder under ``output-dir`` (``latest`` points at it): ``run.json``,
``history.csv`` after every round, checkpoints of the last ``keep-checkpoints`` rounds and
``final_weights.pt``. ``resume=true`` continues the latest run there in place. Any problem stops
the run with an error, so ``flwr list`` shows it as failed; a known problem (run-config, too few
nodes, missing dataset, every client failing) first logs one ERROR line with the reason and the
fix, before Flower prints the traceback.
"""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flwr_splitms.checkpoint import (
    RunState,
    config_differences,
    latest_run_state,
    save_run_state,
)
from flwr_splitms.config import ConfigError, SplitConfig, validate
from flwr_splitms.data import DatasetUnavailableError
from flwr_splitms.devices import resolve_device
from flwr_splitms.experiment import (
    build_split_model,
    evaluation_data,
    num_classes,
    partition_sizes,
)
from flwr_splitms.history import save_history
from flwr_splitms.protocol import record_to_state, state_to_record
from flwr_splitms.runs import latest_run_dir, new_run_dir, output_root, saved_run_config
from flwr_splitms.storage import save_checkpoint
from flwr_splitms.strategy import (
    ClientsFailedError,
    MSSplitStrategy,
    NotEnoughNodesError,
    wait_for_nodes,
)

log = logging.getLogger("flwr")
app = ServerApp()


class RunConfigError(RuntimeError):
    """The run cannot start as configured (the lines above say why)."""


# Problems that stop a run with a message naming the reason and the fix (not bugs)
STOPS = (
    RunConfigError,
    ConfigError,
    NotEnoughNodesError,
    DatasetUnavailableError,
    ClientsFailedError,
)


def fail(problems: list[str]) -> RunConfigError:
    """Log one ERROR line per problem (each names its fix); return the error that stops the run."""
    for line in problems:
        log.error("%s", line)
    return RunConfigError(f"{len(problems)} problem(s) with the run-config: " + "; ".join(problems))


def check(run_config: dict, grid: Grid) -> SplitConfig:
    """The whole run-config, before any data or model is built; then the data against it."""
    problems = validate(run_config)
    if problems:
        raise fail(problems)
    config = SplitConfig.from_run_config(run_config)
    try:
        resolve_device(config.device)
    except ValueError as err:
        raise fail([f"device={config.device!r}: {err}"]) from None
    nodes = wait_for_nodes(grid, config.min_nodes, config.node_wait)
    try:
        sizes = partition_sizes(config, nodes)
    except DatasetUnavailableError as err:
        raise fail([str(err)]) from None
    problems = validate(run_config, partition_sizes=sizes)
    if problems:
        raise fail(problems)
    return config


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run :func:`train`; a known problem logs one ERROR line (reason and fix) before it raises."""
    try:
        train(grid, context)
    except STOPS as err:
        if not isinstance(err, RunConfigError):  # fail() has logged those lines
            log.error("The run stops: %s", err)
        raise


def train(grid: Grid, context: Context) -> None:
    """Train, evaluate after every round, checkpoint, and keep history.csv up to date."""
    run_config = dict(context.run_config)
    config = check(run_config, grid)
    root = output_root(config.output_dir)
    resume: RunState | None = None
    if config.resume:
        folder = latest_run_dir(root)
        if folder is None:
            raise fail([f"resume=true: no run under {root} to resume; start with resume=false"])
        differences = config_differences(saved_run_config(folder), config.to_run_config())
        if differences:
            raise fail(
                [f"resume=true: the run-config differs from {folder}: " + ", ".join(differences)]
            )
        resume = latest_run_state(folder)
        log.info("Resuming %s after round %s", folder, resume.server_round if resume else 0)
    else:
        folder = new_run_dir(root, context.run_id, config.to_run_config())
    evaluation_set = evaluation_data(config)
    client_net, server_net = build_split_model(config)
    strategy = MSSplitStrategy.from_config(config, server_net, num_classes=num_classes(config))
    log.info("Writing history.csv, checkpoints and final weights to %s", folder)

    def checkpoint(server_round: int, arrays, row) -> None:  # type: ignore[no-untyped-def]
        save_history(strategy.history, folder / "history.csv")
        state = strategy.run_state(server_round, arrays)
        state.run_config = config.to_run_config()
        save_run_state(folder, state, keep=config.keep_checkpoints)

    strategy.round_callbacks.append(checkpoint)
    result = strategy.start(
        grid,
        state_to_record(client_net.state_dict()),
        num_rounds=config.num_server_rounds,
        timeout=config.step_timeout,
        evaluate_fn=strategy.central_evaluator(client_net, evaluation_set),
        resume=resume,
    )
    save_history(result.history, folder / "history.csv")
    save_checkpoint(
        folder / "final_weights.pt",
        {
            "client": record_to_state(result.arrays),
            "server": strategy.server_model.state_dict(),
            "run_config": config.to_run_config(),
        },
    )
    log.info("Done: %s", folder / "history.csv")
