"""MSSplitStrategy: SplitFed with compressed cut-layer activations, as a Flower strategy.

Flower's ClientApps only answer, so the strategy drives every step of a round. The round loop
is the core's (:class:`flwr_splitms.core.round.SplitRun`), shared with the local engine; here
it reaches the clients through messages (:mod:`flwr_splitms.remote_clients` over
:mod:`flwr_splitms.transport`). Which nodes train in a round and how their client-side weights
are combined is decided by a Flower strategy, the ``aggregator`` (plain FedAvg by default):
its ``configure_train`` samples the nodes and makes the round-start content, its
``aggregate_train`` aggregates the weights the clients return at the round end.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy
from torch import nn

from flwr_splitms.aggregators import (
    aggregate_client_halves,
    aggregator_from_name,
    check_aggregator,
    drawing_from,
)
from flwr_splitms.checkpoint import RunState
from flwr_splitms.codecs import Codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.core.link import link_for
from flwr_splitms.core.round import RoundPlan, SplitRun, codec_params_of, with_scores
from flwr_splitms.core.schedule import describe_lr
from flwr_splitms.data import BatchSource
from flwr_splitms.evaluation import central_evaluator, evaluation_content, score_replies
from flwr_splitms.history import HISTORY_COLUMNS
from flwr_splitms.protocol import (
    NUM_EXAMPLES,
    SPLIT_BEGIN,
    SPLIT_EVALUATE,
    record_to_state,
    state_to_record,
)
from flwr_splitms.remote_clients import RemoteClients, retyped
from flwr_splitms.transport import AdaptiveWait, Transport, sample, wait_for_nodes

log = logging.getLogger("flwr")
_DEFAULTS = SplitConfig()
_FROM_CONFIG = {f.name for f in fields(SplitConfig)} | {"codec_params", "grad_codec_params"}
_FROM_CONFIG -= {"num_classes"}  # 0 in a run-config: the model's own (None here)


@dataclass
class SplitResult(Result):
    """Flower's ``Result`` plus the per-round metrics as a DataFrame (see HISTORY_COLUMNS)."""

    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))


class MSSplitStrategy(FedAvg):
    """SplitFed with compressed cut-layer activations, as a Flower ``FedAvg`` strategy.

    It holds the server half (model, SGD), the learning-rate rule and the codecs of both ways;
    ``start`` runs the rounds. Defaults are :class:`SplitConfig`'s (keys: the names, hyphenated).

    Parameters
    ----------
    server_model : the server-side network (moved to ``device``).
    aggregator : a Flower strategy (FedAvg, FedAvgM, FedAdam, FedMedian, Krum, FedTrimmedAvg, a
        server-side DP wrapper, ...) that samples each round's nodes and aggregates their
        client-side weights; a name (the run-config key ``aggregator``: ``"fedavg"``, the
        default, ``"fedadam"``, ``"fedmedian"``, ...) builds that strategy with this strategy's
        training options (``fraction_train``, ``min_train_nodes``, ...); None = ``"fedavg"``.
        Strategies that need the client to change (FedProx's proximal term, client-side clip)
        are refused.
    codec, codec_params : uplink codec of the activations and its parameters (``codec-*``);
        None = the codec's defaults. grad_codec, grad_codec_params : the same for the gradients
        sent back (``"none"``: raw, as in the paper).
    lr, momentum, weight_decay : SGD of both halves. lr_scaling : ``"sqrt"``: ``lr`` is the rate
        at a batch of 64, scaled with the square root of ``batch_size``; ``"linear"``: with
        ``batch_size`` itself; ``"none"``: as given (the paper).
        warmup_steps : the run's first steps ramp the rate up linearly (0 = off). head_lr_scale :
        the server model's output layer (its last ``nn.Linear``) trains at this share of the
        rate (1 = the paper). lr_schedule : ``"cosine"``, ``"step"`` or ``"constant"`` over the
        rounds. reestimate_bn : at each round's end both halves' BatchNorm statistics become
        those of their latest batches under the final weights (evaluation only; False =
        PyTorch's running averages, as in the paper).
    batch_size, steps_per_round : examples per client and step; steps per round (0 = one epoch
        of the smallest sampled partition). steps_per_message : K steps per round trip (1 = the
        exact algorithm).
    augment, seed : crop-and-flip of training batches; seed of data order, augmentation,
        randomized codecs and node sampling.
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` for the server half.
    eval_batch_size, eval_max_examples, error_every : evaluation batch and examples (0 = all);
        the compression error is measured every N-th step.
    budget_bits, budget_every, budget_sample, grad_budget_bits : ``codec="budget"``: the uplink's
        bits per element (headers included), chosen every N rounds from the candidates measured
        on M rows; the gradients' budget (0 = ``grad_codec`` as given).
    num_classes : bound of the labels clients may send (None: the last ``nn.Linear``'s outputs).
    node_wait : seconds to wait for ``min_available_nodes``, then :class:`NotEnoughNodesError`.
    wait_factor, wait_floor, drop_slow, poll_interval : a deployed step waits ``wait_factor`` x
        the slowest recent reply (at least ``wait_floor`` s; first pulls ``poll_interval`` s
        apart), then drops the late; ``drop_slow`` None = never in Flower's simulation engine.
    **fedavg_kwargs : ``FedAvg``'s own options; ``weighted_by_key`` must stay ``"num-examples"``.
    """

    def __init__(
        self,
        server_model: nn.Module,
        *,
        aggregator: Strategy | str | None = _DEFAULTS.aggregator,
        codec: str = _DEFAULTS.codec,
        codec_params: Mapping[str, Any] | None = None,
        grad_codec: str = _DEFAULTS.grad_codec,
        grad_codec_params: Mapping[str, Any] | None = None,
        lr: float = _DEFAULTS.lr,
        momentum: float = _DEFAULTS.momentum,
        weight_decay: float = _DEFAULTS.weight_decay,
        lr_schedule: str = _DEFAULTS.lr_schedule,
        lr_scaling: str = _DEFAULTS.lr_scaling,
        warmup_steps: int = _DEFAULTS.warmup_steps,
        head_lr_scale: float = _DEFAULTS.head_lr_scale,
        reestimate_bn: bool = _DEFAULTS.reestimate_bn,
        batch_size: int = _DEFAULTS.batch_size,
        steps_per_round: int = _DEFAULTS.steps_per_round,
        steps_per_message: int = _DEFAULTS.steps_per_message,
        augment: bool = _DEFAULTS.augment,
        seed: int = _DEFAULTS.seed,
        device: str = _DEFAULTS.device,
        eval_batch_size: int = _DEFAULTS.eval_batch_size,
        eval_max_examples: int = _DEFAULTS.eval_max_examples,
        error_every: int = _DEFAULTS.error_every,
        budget_bits: float = _DEFAULTS.budget_bits,
        budget_every: int = _DEFAULTS.budget_every,
        budget_sample: int = _DEFAULTS.budget_sample,
        grad_budget_bits: float = _DEFAULTS.grad_budget_bits,
        num_classes: int | None = None,
        node_wait: float = _DEFAULTS.node_wait,
        wait_factor: float = _DEFAULTS.wait_factor,
        wait_floor: float = _DEFAULTS.wait_floor,
        drop_slow: bool | None = None,
        poll_interval: float = 0.01,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", _DEFAULTS.fraction_evaluate)
        if fedavg_kwargs.get("weighted_by_key", NUM_EXAMPLES) != NUM_EXAMPLES:
            raise ValueError(
                f"weighted_by_key={fedavg_kwargs['weighted_by_key']!r} is not supported: split "
                f"clients report their example counts as {NUM_EXAMPLES!r}; leave it unset"
            )
        super().__init__(**fedavg_kwargs)
        train_kwargs = {k: v for k, v in fedavg_kwargs.items() if "evaluate" not in k}
        if aggregator is None or isinstance(aggregator, str):  # built with the sampling options
            aggregator = aggregator_from_name(aggregator or "fedavg", **train_kwargs)
        self.aggregator = check_aggregator(aggregator)
        keywords = dict(locals())
        keywords["codec_params"] = codec_params_of(codec, codec_params)
        keywords["grad_codec_params"] = dict(grad_codec_params or {})
        self.plan = plan = RoundPlan.from_keywords(keywords)
        self.run = SplitRun.build(server_model, plan, device=device, num_classes=num_classes)
        self.eval_max_examples, self.node_wait = eval_max_examples, node_wait
        self.wait = AdaptiveWait(math.inf, factor=wait_factor, floor=wait_floor)
        self.drop_slow, self.poll_interval = drop_slow, poll_interval
        self.round_callbacks: list[Callable[[int, ArrayRecord, dict[str, Any]], None]] = []
        plan.check_codecs()  # fails early on a bad codec of either direction

    @classmethod
    def from_config(
        cls, config: SplitConfig, server_model: nn.Module, **kwargs: Any
    ) -> MSSplitStrategy:
        """Build from a :class:`SplitConfig` (the example app's run-config)."""
        names = [*inspect.signature(cls.__init__).parameters, "fraction_train", "fraction_evaluate"]
        settings = {k: getattr(config, k) for k in names if k in _FROM_CONFIG}
        least = {"min_train_nodes": min(config.min_nodes, 2)}  # min-nodes: wait for, not sample
        least["min_available_nodes"] = config.min_nodes
        return cls(server_model, **(settings | least | kwargs))

    @property
    def server_model(self) -> nn.Module:
        """The server-side network."""
        return self.run.server.model

    @property
    def codec(self) -> Codec:
        """The uplink codec."""
        return link_for(self.run.settings(0, train=False)).uplink

    @property
    def history(self) -> pd.DataFrame:
        """Per-round metrics so far (one row per round, columns HISTORY_COLUMNS and more)."""
        return self.run.history(HISTORY_COLUMNS)

    def summary(self) -> None:
        """Log the configuration."""
        self.aggregator.summary()
        log.info("\t└──> Aggregator: %s", type(self.aggregator).__name__)
        p = self.plan
        log.info(
            "\t└──> Split: codec %s %s | grad codec %s %s | %s; %s schedule, warmup %d, output "
            "layer x%s | BatchNorm statistics %s | steps/round %s | steps/message %d | device %s",
            *(p.codec_name, dict(p.codec_params), p.grad_codec_name, dict(p.grad_codec_params)),
            describe_lr(p.lr, p.batch_size, p.lr_scaling),
            *(p.lr_schedule, p.warmup_steps, p.head_lr_scale),
            "re-estimated each round" if p.reestimate_bn else "running averages",
            *(p.steps_per_round or "one epoch", p.steps_per_message),
            self.run.server.device,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round-start messages: the aggregator's sampling and content, as ``split_begin``.

        The round settings are merged into each message's config when the round starts.
        """
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait)
        with drawing_from(self.run.rng):
            messages = self.aggregator.configure_train(server_round, arrays, config, grid)
        return retyped(messages, SPLIT_BEGIN, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregator's aggregate of the client weights, in the clients' own dtypes."""
        return aggregate_client_halves(self.aggregator.aggregate_train, server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: ``evaluate.split`` messages with the inference settings."""
        if self.fraction_evaluate == 0.0:
            return []
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait)
        content = evaluation_content(
            self.run.settings(server_round, train=False),
            arrays,
            config,
            keys=(self.arrayrecord_key, self.configrecord_key),
            max_examples=self.eval_max_examples,
        )
        nodes = sample(grid, self.run.rng, self.fraction_evaluate, self.min_evaluate_nodes)
        return [Message(content, dst_node_id=n, message_type=SPLIT_EVALUATE) for n in nodes]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Score the clients' compressed test activations on the server model, then aggregate."""
        link = link_for(self.run.settings(server_round, train=False))
        scored, examples = score_replies(self.run.server, link, replies)
        aggregated = self.evaluate_metrics_aggr_fn(scored, self.weighted_by_key) if scored else None
        return None if aggregated is None else MetricRecord({NUM_EXAMPLES: examples, **aggregated})

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        resume: RunState | None = None,
    ) -> SplitResult:
        """Run ``num_rounds`` rounds (those after ``resume.server_round``, a checkpoint's).

        ``timeout`` bounds each step's wait for replies; ``train_config`` / ``evaluate_config``
        entries reach the clients in every training / evaluation message.
        """
        log.info("Starting %s: %d rounds", type(self).__name__, num_rounds)
        self.summary()
        self.wait.ceiling, transport = timeout, self.transport(grid)
        result, arrays = SplitResult(), initial_arrays
        if resume is not None:
            arrays = self.restore(resume)
            log.info("Resuming after round %d", resume.server_round)
        elif evaluate_fn is not None and (initial := evaluate_fn(0, arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = initial
        for server_round in range(self.run.first_round, num_rounds + 1):
            new_arrays, row, metrics = self.train_round(
                transport, server_round, num_rounds, arrays, train_config
            )
            arrays = new_arrays if new_arrays is not None else arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            fed = self.federated_evaluate(transport, server_round, arrays, evaluate_config)
            if fed is not None:
                result.evaluate_metrics_clientapp[server_round] = fed
                with_scores(row, fed, prefix="fed_")
            central = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            if central is not None:
                result.evaluate_metrics_serverapp[server_round] = central
                with_scores(row, central)
            self.run.record(row, num_rounds)
            for callback in self.round_callbacks:
                callback(server_round, arrays, row)
        result.arrays, result.history = arrays, self.history
        return result

    def transport(self, grid: Grid) -> Transport:
        """How this run's messages move over ``grid`` (override to instrument it)."""
        wait, poll, drop_slow = self.wait, self.poll_interval, self.drop_slow
        return Transport(grid, wait, poll_interval=poll, drop_slow=drop_slow)

    def train_round(
        self,
        transport: Transport,
        server_round: int,
        num_rounds: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord | None = None,
    ) -> tuple[ArrayRecord | None, dict[str, Any], MetricRecord | None]:
        """One round on the nodes the aggregator samples; the aggregate (None if it failed)."""
        begin = self.configure_train(
            server_round, arrays, ConfigRecord(dict(train_config or {})), transport.grid
        )
        clients = RemoteClients(
            transport,
            {m.metadata.dst_node_id: m for m in begin},
            configrecord_key=self.configrecord_key,
            extra=train_config,
            cursors=self.run.cursors,
        )
        outcome = self.run.round(clients, server_round, num_rounds)
        if not outcome.ends:
            return None, outcome.row, None
        new_arrays, metrics = self.aggregate_train(server_round, [e.reply for e in outcome.ends])
        return new_arrays, outcome.row, metrics

    def federated_evaluate(
        self,
        transport: Transport,
        server_round: int,
        arrays: ArrayRecord,
        evaluate_config: ConfigRecord | None = None,
    ) -> MetricRecord | None:
        """Clients send compressed activations of their local test splits; the server scores."""
        messages = self.configure_evaluate(
            server_round, arrays, evaluate_config or ConfigRecord(), transport.grid
        )
        exchange = transport.exchange({m.metadata.dst_node_id: m for m in messages})
        return self.aggregate_evaluate(server_round, exchange.replies.values())

    def run_state(self, server_round: int, arrays: ArrayRecord) -> RunState:
        """Everything needed to continue after ``server_round`` (a checkpoint)."""
        return self.run.run_state(server_round, record_to_state(arrays))

    def restore(self, state: RunState) -> ArrayRecord:
        """Adopt a saved run state; returns the global client weights to continue from."""
        return state_to_record(self.run.restore(state))

    def central_evaluator(
        self,
        client_model: nn.Module,
        test_data: BatchSource,
        *,
        batch_size: int | None = None,
        max_examples: int | None = None,
    ) -> Callable[[int, ArrayRecord], MetricRecord]:
        """An ``evaluate_fn`` for :meth:`start`: global client weights + this server model."""
        return central_evaluator(
            client_model,
            self.server_model,
            lambda: self.codec,
            test_data,
            batch_size=batch_size or self.plan.eval_batch_size,
            max_examples=self.eval_max_examples if max_examples is None else max_examples,
        )
