"""ServerApp: checks the run-config, then trains the server half of ResNet18 with MSSplitStrategy.

Results go to a fresh folder under ``output-dir`` (``latest`` points at it): ``run.json``,
``history.csv`` after every round, checkpoints of the last ``keep-checkpoints`` rounds and
``final_weights.pt``. ``resume=true`` continues the latest run there in place. Any problem stops
the run with an error, so ``flwr list`` shows it as failed; a known problem (run-config, too few
nodes, missing dataset, every client failing) first logs one ERROR line with the reason and the
fix, before Flower prints the traceback.
"""

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from flwr_splitms.capacity import (
    SERVER_PARTS,
    InsufficientMemoryError,
    available_memory,
    check_memory,
    gib,
)
from flwr_splitms.checkpoint import (
    RunState,
    config_differences,
    latest_run_state,
    save_run_state,
)
from flwr_splitms.client import cache_bytes_from_env
from flwr_splitms.config import ConfigError, SplitConfig, validate
from flwr_splitms.data import BatchSource, DatasetUnavailableError
from flwr_splitms.devices import resolve_device
from flwr_splitms.experiment import (
    build_split_model,
    evaluation_data,
    memory_estimate,
    num_classes,
    partition_sizes,
)
from flwr_splitms.flower_internals import is_simulation_grid
from flwr_splitms.history import save_history
from flwr_splitms.protocol import record_to_state, state_to_record
from flwr_splitms.runs import latest_run_dir, new_run_dir, output_root, saved_run_config
from flwr_splitms.storage import save_checkpoint
from flwr_splitms.strategy import MSSplitStrategy
from flwr_splitms.transport import ClientsFailedError, NotEnoughNodesError, wait_for_nodes

log = logging.getLogger("flwr")
app = ServerApp()


class RunConfigError(RuntimeError):
    """The run cannot start as configured (the lines above say why)."""


# Problems that stop a run with a message naming the reason and the fix (not bugs)
STOPS = (
    RunConfigError,
    InsufficientMemoryError,
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


def check_memory_fits(
    config: SplitConfig,
    grid: Grid,
    strategy: MSSplitStrategy,
    client_net: nn.Module,
    evaluation_set: BatchSource,
) -> None:
    """Refuse, in one line, a run whose estimated memory exceeds what the machine has free.

    The estimate (see ``flwr_splitms.capacity``) counts what training will allocate: the server
    step over the sampled clients, the server model, evaluation, and, in simulation, the client
    halves of the sampled clients and the bounded caches of the idle ones.
    """
    registered = len(list(grid.get_node_ids()))
    sampler = strategy.aggregator  # samples as FedAvg: a fraction of the nodes, at least a minimum
    fraction = getattr(sampler, "fraction_train", strategy.fraction_train)
    minimum = getattr(sampler, "min_train_nodes", strategy.min_train_nodes)
    sampled = min(registered, max(int(registered * fraction), minimum))
    simulation = is_simulation_grid(grid)
    estimate = memory_estimate(
        config,
        client_net,
        strategy.server_model,
        evaluation_set,
        registered=registered,
        sampled=sampled,
        train_size=sum(partition_sizes(config, registered)),
        client_processes=os.cpu_count() or 1,
        cache_bytes=cache_bytes_from_env(),
        clients_here=simulation,
    )
    device = next(strategy.server_model.parameters()).device
    host = available_memory("cpu")
    log.info(
        "Memory: about %s for %d registered and %d sampled nodes (%s); %s available",
        gib(estimate.total),
        registered,
        sampled,
        estimate.summary(),
        gib(host) if host is not None else "unknown",
    )
    if device.type == "cuda":  # the server's parts on its GPU, the rest (clients) on the host
        check_memory(estimate.subset(SERVER_PARTS), available_memory(device), where=str(device))
        estimate = estimate.subset(SERVER_PARTS, keep=False)
    check_memory(estimate, host, where="this machine")


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
    resumed: Path | None = None  # the run folder to continue in
    if config.resume:
        resumed = latest_run_dir(root)
        if resumed is None:
            raise fail([f"resume=true: no run under {root} to resume; start with resume=false"])
        differences = config_differences(saved_run_config(resumed), config.to_run_config())
        if differences:
            raise fail(
                [f"resume=true: the run-config differs from {resumed}: " + ", ".join(differences)]
            )
        resume = latest_run_state(resumed)
    evaluation_set = evaluation_data(config)
    client_net, server_net = build_split_model(config)
    strategy = MSSplitStrategy.from_config(config, server_net, num_classes=num_classes(config))
    check_memory_fits(config, grid, strategy, client_net, evaluation_set)
    if resumed is None:  # a new run's folder only once it is known to fit
        folder = new_run_dir(root, context.run_id, config.to_run_config())
    else:
        folder = resumed
        log.info("Resuming %s after round %s", folder, resume.server_round if resume else 0)
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
