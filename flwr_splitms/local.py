"""SplitFed in one process, without Flower: the engine for quick studies and the equivalence oracle.

It drives the same core as the Flower adapters (:mod:`flwr_splitms.core`): the same client half,
server half, round accounting and FedAvg, with the same seeds and order of operations, but no
messages: every client keeps its live model, so the autograd graph of a block simply survives
until the server's gradients come back. The equivalence test runs both engines and compares
weights, losses and bytes, which checks the message adapters (state round trips, recomputation).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from flwr_splitms.checkpoint import RunState, save_run_state
from flwr_splitms.config import SplitConfig
from flwr_splitms.core.accounting import RoundAccumulator, StepProgress, log_round
from flwr_splitms.core.aggregation import fedavg
from flwr_splitms.core.client_half import SplitClientCore
from flwr_splitms.core.link import link_for
from flwr_splitms.core.schedule import first_block, lr_at_round, plan_blocks, scaled_lr
from flwr_splitms.core.server_half import ClientUpload, SplitServerCore, evaluate_split
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.data import BatchSource
from flwr_splitms.devices import resolve_device
from flwr_splitms.history import HISTORY_COLUMNS

log = logging.getLogger("flwr")


@dataclass
class LocalResult:
    """Outcome of :func:`run_local`: history and the final weights of both halves."""

    history: pd.DataFrame
    client_weights: dict[str, torch.Tensor]
    server_weights: dict[str, torch.Tensor]
    config: SplitConfig = field(repr=False)


def round_settings(
    config: SplitConfig, server_round: int, lr: float, step_offset: int = 0
) -> StepSettings:
    """The settings a round of ``config`` runs with (what the strategy sends its clients)."""
    return StepSettings(
        server_round=server_round,
        lr=lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        seed=config.seed,
        augment=config.augment,
        codec_name=config.codec,
        codec_params=config.codec_params,
        grad_codec_name=config.grad_codec,
        grad_codec_params=config.grad_codec_params,
        error_every=config.error_every,
        warmup_steps=config.warmup_steps,
        step_offset=step_offset,
    )


def _build(
    config: SplitConfig,
    num_clients: int,
    models: tuple[nn.Module, nn.Module] | None,
    client_data: Sequence[BatchSource] | None,
    test_data: BatchSource | None,
    evaluate: bool,
) -> tuple[nn.Module, nn.Module, list[BatchSource], BatchSource | None]:
    """The networks and data of a run: the user's own, or built from ``config`` by name."""
    from flwr_splitms import experiment  # builds the paper's models and datasets by name

    client_net, server_net = models if models is not None else experiment.build_split_model(config)
    if client_data is not None:
        if len(client_data) != num_clients:
            raise ValueError(
                f"client_data holds {len(client_data)} data sets for {num_clients} clients; "
                "pass one BatchSource per client"
            )
        train = list(client_data)
    else:
        train = [experiment.client_data(config, c, num_clients)[0] for c in range(num_clients)]
    if evaluate and test_data is None and models is None and client_data is None:
        test_data = experiment.evaluation_data(config)
    return client_net, server_net, train, test_data if evaluate else None


def run_local(
    config: SplitConfig,
    num_clients: int,
    *,
    device: str | None = None,
    evaluate: bool = True,
    models: tuple[nn.Module, nn.Module] | None = None,
    client_data: Sequence[BatchSource] | None = None,
    test_data: BatchSource | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: RunState | None = None,
    round_callback: Callable[[int, dict[str, float]], None] | None = None,
) -> LocalResult:
    """Train ``config`` with ``num_clients`` simulated clients; returns per-round history.

    ``models=(client_net, server_net)``, ``client_data`` (one BatchSource per client) and
    ``test_data`` replace the networks and data that ``config`` names (bring your own).
    ``device`` overrides ``config.device``. Clients are sampled per round with
    ``fraction-train`` (all of them at 1.0) and run in client-id order.

    ``checkpoint_dir`` keeps a checkpoint of the last ``keep-checkpoints`` rounds there;
    ``resume`` (:func:`flwr_splitms.checkpoint.latest_run_state` of such a folder) continues
    after its round and gives exactly the run that was not interrupted. ``round_callback(round,
    row)`` is called after every round.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    resolved = resolve_device(device or config.device)
    link_for(round_settings(config, 0, config.lr))  # a bad codec fails before anything is built
    client_net, server_net, train, test_set = _build(
        config, num_clients, models, client_data, test_data, evaluate
    )
    global_weights = {k: v.detach().cpu().clone() for k, v in client_net.state_dict().items()}
    server = SplitServerCore(
        server_net,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        device=resolved,
    )
    cores = [
        SplitClientCore(copy.deepcopy(client_net), data, client_id=cid, device=resolved)
        for cid, data in enumerate(train)
    ]
    cursors: list[tuple[int, int, int] | None] = [None] * num_clients
    sampler = random.Random(config.seed)
    rows: list[dict[str, float]] = []
    first_round = 1
    if resume is not None:
        global_weights = _restore(resume, server, cursors, sampler, rows)
        first_round = resume.server_round + 1
    for server_round in range(first_round, config.num_server_rounds + 1):
        count = max(int(num_clients * config.fraction_train), 1)
        active = (
            sorted(sampler.sample(range(num_clients), count))
            if count < num_clients
            else list(range(num_clients))
        )
        offset = sum(int(r["steps"]) for r in rows)
        global_weights, row = _round(
            config, server, cores, cursors, active, server_round, global_weights, offset
        )
        if test_set is not None:
            client_net.load_state_dict(global_weights)
            scores = evaluate_split(
                client_net.to(resolved),
                server.model,
                link_for(round_settings(config, server_round, 0.0)).uplink,
                test_set,
                batch_size=config.eval_batch_size,
                max_examples=config.eval_max_examples,
            )
            row.update(
                test_loss=scores["loss"], test_accuracy=scores["accuracy"], test_top5=scores["top5"]
            )
        else:
            row.update(test_loss=math.nan, test_accuracy=math.nan, test_top5=math.nan)
        rows.append(row)
        log_round(row, config.num_server_rounds, engine="local")
        if checkpoint_dir is not None:
            state = RunState(
                server_round=server_round,
                client_weights=global_weights,
                server_weights={
                    k: v.detach().cpu().clone() for k, v in server.model.state_dict().items()
                },
                server_optimizer=server.optimizer.state_dict(),
                history=[dict(r) for r in rows],
                cursors={c: cursor for c, cursor in enumerate(cursors) if cursor is not None},
                sampler_state=sampler.getstate(),
                run_config=config.to_run_config(),
            )
            save_run_state(checkpoint_dir, state, keep=config.keep_checkpoints)
        if round_callback is not None:
            round_callback(server_round, row)
    columns = list(dict.fromkeys([*HISTORY_COLUMNS, *(k for row in rows for k in row)]))
    history = pd.DataFrame(rows, columns=columns)
    server_weights = {k: v.detach().cpu().clone() for k, v in server.model.state_dict().items()}
    return LocalResult(history, global_weights, server_weights, config)


def _restore(
    state: RunState,
    server: SplitServerCore,
    cursors: list[tuple[int, int, int] | None],
    sampler: random.Random,
    rows: list[dict[str, float]],
) -> dict[str, torch.Tensor]:
    """Adopt a checkpoint: server half, client cursors, sampler, history; the global weights."""
    server.model.load_state_dict(state.server_weights)
    server.optimizer.load_state_dict(state.server_optimizer)
    for client_id, cursor in state.cursors.items():
        cursors[client_id] = cursor
    if state.sampler_state is not None:
        sampler.setstate(state.sampler_state)
    rows.extend(dict(row) for row in state.history)
    return {k: v.clone() for k, v in state.client_weights.items()}


def _round(
    config: SplitConfig,
    server: SplitServerCore,
    cores: list[SplitClientCore],
    cursors: list[tuple[int, int, int] | None],
    active: list[int],
    server_round: int,
    global_weights: dict[str, torch.Tensor],
    step_offset: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round on the sampled clients, in the order of operations of the Flower path."""
    base = scaled_lr(config.lr, config.batch_size, config.lr_scaling)
    lr = lr_at_round(base, config.lr_schedule, server_round, config.num_server_rounds)
    server.set_lr(lr)
    settings = round_settings(config, server_round, lr, step_offset)
    link = link_for(settings)
    acc = RoundAccumulator(server_round, lr, num_clients=len(active))
    round_states = {c: cores[c].start_round(global_weights, cursors[c]) for c in active}
    steps = config.steps_per_round or min(
        len(cores[c].train_data) // config.batch_size for c in active
    )
    first = first_block(config.steps_per_round, config.steps_per_message)
    blocks = plan_blocks(max(steps, 1), config.steps_per_message, first)
    progress = StepProgress(f"[local] round {server_round}", sum(blocks))
    step = 0
    for count in blocks:
        uploads, slowest = {}, 0.0
        for c in active:
            tic = time.perf_counter()
            batches = cores[c].forward(round_states[c], settings, range(step, step + count))
            slowest = max(slowest, time.perf_counter() - tic)
            uploads[c] = ClientUpload.of_batches(c, batches)
            acc.uplink(uploads[c])
        acc.client_seconds += slowest
        tic = time.perf_counter()
        block = server.run_block(link, settings, uploads, step, count)
        acc.server_seconds += time.perf_counter() - tic
        if block.dropped:
            raise RuntimeError(
                f"the local engine's own clients sent unusable data: {block.dropped}"
            )
        acc.losses.extend(block.losses)
        step += count
        progress.update(step, block.losses[-1])
        slowest = 0.0
        for c in active:
            acc.downlink(block.gradients[c])
            tic = time.perf_counter()
            cores[c].backward(round_states[c], settings, block.gradients[c])
            slowest = max(slowest, time.perf_counter() - tic)
        acc.client_seconds += slowest
    for c in active:
        cursors[c] = SplitClientCore.cursor(round_states[c])
    weights = fedavg(
        [round_states[c].weights for c in active], [float(step * config.batch_size)] * len(active)
    )
    return weights, acc.row()
