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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from flwr_splitms.checkpoint import RunState, save_run_state
from flwr_splitms.config import SplitConfig
from flwr_splitms.core.accounting import RoundAccumulator
from flwr_splitms.core.aggregation import fedavg
from flwr_splitms.core.batches import DataCursor
from flwr_splitms.core.budget import Measurement
from flwr_splitms.core.client_half import ClientState, SplitClientCore
from flwr_splitms.core.link import link_for
from flwr_splitms.core.round import ClientEnd, RoundPlan, SplitRun, with_scores
from flwr_splitms.core.server_half import ClientUpload, evaluate_split
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

    ``checkpoint_dir`` keeps the last ``keep-checkpoints`` rounds' checkpoints; ``resume`` (its
    :func:`~flwr_splitms.checkpoint.latest_run_state`) continues exactly the interrupted run.
    ``round_callback(round, row)`` is called after every round.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if config.aggregator != "fedavg":
        raise ValueError(
            f"aggregator={config.aggregator!r}: the local engine averages with FedAvg only; run "
            "the Flower app (flwr run) for another aggregator, or set aggregator='fedavg'"
        )
    resolved = resolve_device(device or config.device)
    plan = RoundPlan.from_config(config)
    plan.check_codecs()  # a bad codec fails before anything is built
    client_net, server_net, train, test_set = _build(
        config, num_clients, models, client_data, test_data, evaluate
    )
    global_weights = {k: v.detach().cpu().clone() for k, v in client_net.state_dict().items()}
    run = SplitRun.build(server_net, plan, device=resolved, label="[local]")
    cores = [
        SplitClientCore(copy.deepcopy(client_net), data, client_id=cid, device=resolved)
        for cid, data in enumerate(train)
    ]
    global_weights = run.restore(resume) if resume is not None else global_weights
    for server_round in range(run.first_round, config.num_server_rounds + 1):
        count = max(int(num_clients * config.fraction_train), 1)
        active = sorted(run.rng.sample(range(num_clients), count)) if count < num_clients else None
        clients = LocalClients(cores, active or range(num_clients), global_weights, run.cursors)
        outcome = run.round(clients, server_round, config.num_server_rounds)
        if outcome.ends:
            global_weights = fedavg(
                [end.reply for end in outcome.ends],
                [float(end.num_examples) for end in outcome.ends],
            )
        client_net.load_state_dict(global_weights)
        with_scores(outcome.row, _evaluate(config, client_net.to(resolved), run, test_set))
        run.record(outcome.row, config.num_server_rounds, engine="local")
        if checkpoint_dir is not None:
            state = run.run_state(server_round, global_weights)
            state.run_config = config.to_run_config()
            save_run_state(checkpoint_dir, state, keep=config.keep_checkpoints)
        if round_callback is not None:
            round_callback(server_round, outcome.row)
    server_weights = {k: v.detach().cpu().clone() for k, v in run.server.model.state_dict().items()}
    return LocalResult(run.history(HISTORY_COLUMNS), global_weights, server_weights, config)


def _evaluate(
    config: SplitConfig, client_net: nn.Module, run: SplitRun, test_set: BatchSource | None
) -> dict[str, float] | None:
    """The global client half and the server half on the test set, through the uplink codec."""
    if test_set is None:
        return None
    return evaluate_split(
        client_net,
        run.server.model,
        link_for(run.settings(0, train=False)).uplink,
        test_set,
        batch_size=config.eval_batch_size,
        max_examples=config.eval_max_examples,
    )


class LocalClients:
    """The sampled clients of a local round: direct calls to their client halves (no messages).

    Every client keeps its live model, so a block's autograd graph survives until its gradients
    come back. Client seconds are the slowest client's, as if they ran in parallel.
    """

    def __init__(
        self,
        cores: Sequence[SplitClientCore],
        active: Sequence[int],
        weights: Mapping[str, torch.Tensor],
        cursors: Mapping[int, DataCursor],
    ) -> None:
        self.cores, self.active = cores, list(active)
        self.weights, self.cursors = weights, cursors
        self.states: dict[int, ClientState] = {}

    def probe(
        self, settings: StepSettings, budget_bits: float, sample: int, acc: RoundAccumulator
    ) -> list[dict[str, Measurement]]:
        """codec = "budget": each client measures the candidate codecs on its first batch."""
        return [
            self.cores[c].probe(
                self.weights, self.cursors.get(c), settings, budget_bits=budget_bits, sample=sample
            )
            for c in self.active
        ]

    def begin(
        self, settings: StepSettings, count: int, acc: RoundAccumulator
    ) -> tuple[dict[int, ClientUpload], dict[int, int]]:
        """Round start: global weights and cursors in, the first block's uploads out."""
        for c in self.active:
            self.states[c] = self.cores[c].start_round(self.weights, self.cursors.get(c))
        sizes = {c: len(self.cores[c].train_data) for c in self.active}
        return self._forward(settings, 0, count, acc), sizes

    def step(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        step: int,
        count: int,
        acc: RoundAccumulator,
    ) -> dict[int, ClientUpload]:
        """The pending block's gradients in, the next block's uploads out."""
        self._backward(settings, gradients, acc)
        return self._forward(settings, step, count, acc, only=gradients)

    def end(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        step: int,
        acc: RoundAccumulator,
    ) -> dict[int, ClientEnd[dict[str, torch.Tensor]]]:
        """The last gradients in; each client's weights, example count and cursor out."""
        self._backward(settings, gradients, acc, round_end=True)
        return {
            c: ClientEnd(
                client_id=c,
                num_examples=step * settings.batch_size,
                cursor=SplitClientCore.cursor(self.states[c]),
                reply=self.states[c].weights,
            )
            for c in gradients
        }

    def _forward(
        self,
        settings: StepSettings,
        step: int,
        count: int,
        acc: RoundAccumulator,
        only: Mapping[int, object] | None = None,
    ) -> dict[int, ClientUpload]:
        uploads, slowest = {}, 0.0
        for c in self.active if only is None else sorted(only):
            tic = time.perf_counter()
            batches = self.cores[c].forward(self.states[c], settings, range(step, step + count))
            slowest = max(slowest, time.perf_counter() - tic)
            uploads[c] = ClientUpload.of_batches(c, batches)
        acc.client_seconds += slowest
        return uploads

    def _backward(
        self,
        settings: StepSettings,
        gradients: Mapping[int, Sequence[bytes]],
        acc: RoundAccumulator,
        *,
        round_end: bool = False,
    ) -> None:
        slowest = 0.0
        for c in sorted(gradients):
            tic = time.perf_counter()
            self.cores[c].backward(self.states[c], settings, gradients[c], round_end=round_end)
            slowest = max(slowest, time.perf_counter() - tic)
        acc.client_seconds += slowest
