"""MSSplitStrategy: the Flower adapter for the server half of SplitFed.

Flower's ClientApps only answer, so the strategy drives every step of a round: it sends the round
start, then per block of steps it hands the clients' compressed activations to the server half
(:class:`flwr_splitms.core.SplitServerCore`), which steps the server model and produces each
client's gradient, and sends those back in the message that also asks for the next block (one
round trip per block). At round end the client-side weights are averaged with FedAvg's own
aggregation. Steps are driven with ``push_messages`` and a short polling loop:
``send_and_receive`` of the HTTP grid sleeps 3 s between pulls, far longer than a step.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from flwr_splitms import protocol as P
from flwr_splitms.checkpoint import RunState
from flwr_splitms.codecs import Codec, get_codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.core.accounting import RoundAccumulator, StepProgress, log_round
from flwr_splitms.core.link import link_for
from flwr_splitms.core.schedule import (
    LR_SCHEDULES,
    first_block,
    lr_at_round,
    plan_blocks,
    scaled_lr,
)
from flwr_splitms.core.server_half import ClientUpload, SplitServerCore, evaluate_split
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.data import BatchSource
from flwr_splitms.history import HISTORY_COLUMNS

log = logging.getLogger("flwr")
_DEFAULTS = SplitConfig()


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected than the run needs, after waiting ``node_wait`` seconds."""


class ClientsFailedError(RuntimeError):
    """Every client of an exchange failed with the same error: retrying cannot help."""


@dataclass
class SplitResult(Result):
    """Flower's ``Result`` plus the per-round metrics as a DataFrame (see HISTORY_COLUMNS)."""

    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Give averaged arrays the dtypes of the originals (FedAvg's sum comes back as float64)."""
    out = ArrayRecord()
    for key, value in arrays.items():
        dtype = np.dtype(reference[key].dtype) if key in reference else None
        array = value.numpy()
        if dtype is not None and array.dtype != dtype:
            array = np.rint(array) if np.issubdtype(dtype, np.integer) else array
            array = array.astype(dtype)
        out[key] = Array(np.array(array, order="C"))
    return out


class AdaptiveWait:
    """How long to wait for the replies of a step: a multiple of the recent reply times.

    A node that vanished mid-round is dropped after ``factor`` x the median time the last
    replies took (at least ``floor`` seconds), not after the ``ceiling`` (``step-timeout``).
    Until ``warmup`` replies have been seen, the ceiling applies.
    """

    def __init__(
        self, ceiling: float, *, factor: float = 5.0, floor: float = 10.0, warmup: int = 3
    ) -> None:
        self.ceiling, self.factor, self.floor, self.warmup = ceiling, factor, floor, warmup
        self.recent: deque[float] = deque(maxlen=50)

    def budget(self) -> float:
        """Seconds to wait for the next exchange."""
        if len(self.recent) < self.warmup:
            return self.ceiling
        return min(self.ceiling, max(self.floor, self.factor * statistics.median(self.recent)))

    def observe(self, seconds: float) -> None:
        """A reply arrived ``seconds`` after its message was pushed."""
        self.recent.append(seconds)


class MSSplitStrategy(FedAvg):
    """SplitFed with compressed cut-layer activations, as a Flower ``FedAvg`` strategy.

    It holds the server-side model and its SGD optimizer (in a ``SplitServerCore``), the LR
    schedule, and the codecs of both directions. ``start`` runs the rounds and returns a
    :class:`SplitResult`; ``history`` holds the per-round metrics as a DataFrame. Defaults equal
    :class:`~flwr_splitms.config.SplitConfig`'s (the run-config keys in brackets).

    Parameters
    ----------
    server_model : the server-side network (it is moved to ``device``).
    codec, codec_params : uplink codec of the activations and its parameters (``codec``,
        ``codec-*``); None = the codec's own defaults. Checked at construction.
    grad_codec, grad_codec_params : downlink codec of the gradients (``grad-codec``,
        ``grad-codec-*``); ``"none"`` sends raw gradients, as the paper does.
    lr, momentum, weight_decay : SGD of both halves (``lr``, ``momentum``, ``weight-decay``).
    lr_schedule : ``"cosine"``, ``"step"`` or ``"constant"`` over ``num_rounds`` (``lr-schedule``).
    lr_scaling : ``"linear"``: ``lr`` is the rate at a batch of 64 and scales with
        ``batch_size``; ``"none"``: ``lr`` as given, the paper's setting (``lr-scaling``).
    warmup_steps : the run's first steps ramp the rate up linearly (``warmup-steps``; 0 = off).
    batch_size : examples per client and step (``batch-size``).
    steps_per_round : steps per round; 0 = one local epoch of the smallest sampled partition.
    steps_per_message : K steps per round trip (``steps-per-message``); 1 = the exact algorithm;
        K > 1 evaluates the client gradients of a block at the block's starting weights.
    augment : random crop and flip of training batches (``augment``).
    seed : seeds data order, augmentation and randomized codecs (``seed``).
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` for the server model.
    eval_batch_size, eval_max_examples : evaluation batches and examples (0 = all).
    error_every : measure the compression error every N-th step (``error-every``).
    num_classes : bound of the labels clients may send; None = the last ``nn.Linear``'s outputs.
    node_wait : seconds to wait for ``min_available_nodes`` before stopping with
        :class:`NotEnoughNodesError` (``node-wait``).
    wait_factor, wait_floor : the adaptive per-step wait (see :class:`AdaptiveWait`;
        ``wait-factor``, ``wait-floor``).
    poll_interval : seconds between the first pulls for replies.
    **fedavg_kwargs : ``FedAvg``'s own: ``fraction_train``, ``fraction_evaluate``,
        ``min_train_nodes``, ``min_evaluate_nodes``, ``min_available_nodes``,
        ``arrayrecord_key``, ``configrecord_key``, ``train_metrics_aggr_fn``,
        ``evaluate_metrics_aggr_fn``. ``weighted_by_key`` must stay ``"num-examples"`` (what the
        split clients report).
    """

    def __init__(
        self,
        server_model: nn.Module,
        *,
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
        batch_size: int = _DEFAULTS.batch_size,
        steps_per_round: int = _DEFAULTS.steps_per_round,
        steps_per_message: int = _DEFAULTS.steps_per_message,
        augment: bool = _DEFAULTS.augment,
        seed: int = _DEFAULTS.seed,
        device: str = _DEFAULTS.device,
        eval_batch_size: int = _DEFAULTS.eval_batch_size,
        eval_max_examples: int = _DEFAULTS.eval_max_examples,
        error_every: int = _DEFAULTS.error_every,
        num_classes: int | None = None,
        node_wait: float = _DEFAULTS.node_wait,
        wait_factor: float = _DEFAULTS.wait_factor,
        wait_floor: float = _DEFAULTS.wait_floor,
        poll_interval: float = 0.01,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", _DEFAULTS.fraction_evaluate)
        weighted = fedavg_kwargs.get("weighted_by_key", P.NUM_EXAMPLES)
        if weighted != P.NUM_EXAMPLES:
            raise ValueError(
                f"weighted_by_key={weighted!r} is not supported: split clients report their "
                f"example counts as {P.NUM_EXAMPLES!r}; leave weighted_by_key unset"
            )
        super().__init__(**fedavg_kwargs)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        scaled_lr(lr, batch_size, lr_scaling)  # an unknown lr_scaling fails here
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("steps_per_round", steps_per_round, 0),
            ("steps_per_message", steps_per_message, 1),
            ("error_every", error_every, 1),
            ("warmup_steps", warmup_steps, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.codec_name, self.grad_codec_name = codec, grad_codec
        self.codec_params = dict(get_codec(codec, **dict(codec_params or {})).params)
        self.grad_codec_params = dict(grad_codec_params or {})
        self.server = SplitServerCore(
            server_model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            device=device,
            num_classes=num_classes,
        )
        self.base_lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.lr_schedule = lr_schedule
        self.lr_scaling, self.warmup_steps = lr_scaling, warmup_steps
        self.batch_size = batch_size
        self.steps_per_round = steps_per_round
        self.steps_per_message = steps_per_message
        self.augment = augment
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.eval_max_examples = eval_max_examples
        self.error_every = error_every
        self.node_wait = node_wait
        self.poll_interval = poll_interval
        self.wait = AdaptiveWait(math.inf, factor=wait_factor, floor=wait_floor)
        self.rows: list[dict[str, float]] = []
        self.cursors: dict[int, tuple[int, int, int]] = {}  # client id -> its data cursor
        self.round_callbacks: list[Callable[[int, ArrayRecord, dict[str, float]], None]] = []
        link_for(self.settings(0, lr))  # fails early on a bad codec of either direction

    @property
    def server_model(self) -> nn.Module:
        """The server-side network."""
        return self.server.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The server-side SGD optimizer."""
        return self.server.optimizer

    @property
    def device(self) -> torch.device:
        """The server model's device."""
        return self.server.device

    @property
    def codec(self) -> Codec:
        """The uplink codec."""
        return link_for(self.settings(0, self.base_lr)).uplink

    @classmethod
    def from_config(
        cls, config: SplitConfig, server_model: nn.Module, **kwargs: Any
    ) -> MSSplitStrategy:
        """Build from a :class:`SplitConfig` (the example app's run-config)."""
        settings: dict[str, Any] = {
            "codec": config.codec,
            "codec_params": config.codec_params,
            "grad_codec": config.grad_codec,
            "grad_codec_params": config.grad_codec_params,
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "lr_schedule": config.lr_schedule,
            "lr_scaling": config.lr_scaling,
            "warmup_steps": config.warmup_steps,
            "batch_size": config.batch_size,
            "steps_per_round": config.steps_per_round,
            "steps_per_message": config.steps_per_message,
            "augment": config.augment,
            "seed": config.seed,
            "device": config.device,
            "eval_batch_size": config.eval_batch_size,
            "eval_max_examples": config.eval_max_examples,
            "error_every": config.error_every,
            "node_wait": config.node_wait,
            "wait_factor": config.wait_factor,
            "wait_floor": config.wait_floor,
            "fraction_train": config.fraction_train,
            "fraction_evaluate": config.fraction_evaluate,
            "min_available_nodes": config.min_nodes,
            "min_train_nodes": config.min_nodes,
        }
        settings.update(kwargs)
        return cls(server_model, **settings)

    def settings(
        self, server_round: int, lr: float, *, train: bool = True, step_offset: int = 0
    ) -> StepSettings:
        """The round settings sent to the clients (inference settings with ``train=False``)."""
        return StepSettings(
            server_round=server_round,
            lr=lr if train else 0.0,
            momentum=self.momentum if train else 0.0,
            weight_decay=self.weight_decay if train else 0.0,
            batch_size=self.batch_size if train else self.eval_batch_size,
            seed=self.seed,
            augment=self.augment and train,
            codec_name=self.codec_name,
            codec_params=self.codec_params,
            grad_codec_name=self.grad_codec_name,
            grad_codec_params=self.grad_codec_params,
            error_every=self.error_every,
            warmup_steps=self.warmup_steps if train else 0,
            step_offset=step_offset,
        )

    @property
    def history(self) -> pd.DataFrame:
        """Per-round metrics so far (one row per round, columns HISTORY_COLUMNS and more)."""
        extra = [k for row in self.rows for k in row if k not in HISTORY_COLUMNS]
        return pd.DataFrame(self.rows, columns=list(dict.fromkeys([*HISTORY_COLUMNS, *extra])))

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log.info(
            "\t└──> Split: codec %s %s | grad codec %s %s | lr %s (%s) | batch %d | "
            "steps/round %s | steps/message %d | device %s",
            self.codec_name,
            self.codec_params,
            self.grad_codec_name,
            self.grad_codec_params,
            self.base_lr,
            self.lr_schedule,
            self.batch_size,
            self.steps_per_round or "one epoch",
            self.steps_per_message,
            self.device,
        )

    # -- evaluation ---------------------------------------------------------------------------
    def central_evaluator(
        self,
        client_model: nn.Module,
        test_data: BatchSource,
        *,
        batch_size: int | None = None,
        max_examples: int | None = None,
    ) -> Callable[[int, ArrayRecord], MetricRecord]:
        """An ``evaluate_fn`` for :meth:`start`: global client weights + this server model."""
        client_model.to(self.device)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            client_model.load_state_dict(P.record_to_state(arrays))
            result = evaluate_split(
                client_model,
                self.server_model,
                self.codec,
                test_data,
                batch_size=batch_size or self.eval_batch_size,
                max_examples=self.eval_max_examples if max_examples is None else max_examples,
            )
            return MetricRecord(result)  # type: ignore[arg-type]

        return evaluate

    # -- the run ------------------------------------------------------------------------------
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
        """Run ``num_rounds`` SplitFed rounds (the rounds after ``resume.server_round``, if given).

        ``timeout`` is the ceiling of each step's wait for replies (the wait adapts to the
        observed reply times below it); ``train_config`` / ``evaluate_config`` entries reach
        the clients in every training / evaluation message. ``resume`` (a checkpoint's
        :class:`~flwr_splitms.checkpoint.RunState`) restores the server model, its optimizer,
        the history, the clients' data cursors and the sampling RNG, and replaces
        ``initial_arrays`` with the saved global weights.
        """
        log.info("Starting %s: %d rounds", type(self).__name__, num_rounds)
        self.summary()
        self.wait.ceiling = timeout
        result = SplitResult()
        first_round = 1
        if resume is not None:
            initial_arrays = self.restore(resume)
            first_round = resume.server_round + 1
            log.info("Resuming after round %d", resume.server_round)
        result.arrays = initial_arrays
        if evaluate_fn is not None and resume is None:
            initial = evaluate_fn(0, initial_arrays)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
        arrays = initial_arrays
        for server_round in range(first_round, num_rounds + 1):
            new_arrays, row, train_metrics = self.train_round(
                grid, server_round, num_rounds, arrays, timeout, train_config
            )
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            fed = self.federated_evaluate(grid, server_round, arrays, timeout, evaluate_config)
            if fed is not None:
                result.evaluate_metrics_clientapp[server_round] = fed
                row.update(
                    fed_test_loss=_scalar(fed, "loss"), fed_test_accuracy=_scalar(fed, "accuracy")
                )
            if evaluate_fn is not None:
                central = evaluate_fn(server_round, arrays)
                if central is not None:
                    result.evaluate_metrics_serverapp[server_round] = central
                    row.update(
                        test_loss=_scalar(central, "loss"),
                        test_accuracy=_scalar(central, "accuracy"),
                        test_top5=_scalar(central, "top5"),
                    )
            self.rows.append(row)
            log_round(row, num_rounds)
            for callback in self.round_callbacks:
                callback(server_round, arrays, row)
        result.history = self.history
        return result

    def run_state(self, server_round: int, arrays: ArrayRecord) -> RunState:
        """Everything needed to continue after ``server_round`` (a checkpoint)."""
        return RunState(
            server_round=server_round,
            client_weights=P.record_to_state(arrays),
            server_weights={
                k: v.detach().cpu().clone() for k, v in self.server_model.state_dict().items()
            },
            server_optimizer=self.optimizer.state_dict(),
            history=[dict(row) for row in self.rows],
            cursors=dict(self.cursors),
            sampler_state=random.getstate(),
        )

    def restore(self, state: RunState) -> ArrayRecord:
        """Adopt a saved run state; returns the global client weights to continue from."""
        self.server_model.load_state_dict(state.server_weights)
        self.optimizer.load_state_dict(state.server_optimizer)
        self.rows = [dict(row) for row in state.history]
        self.cursors = dict(state.cursors)
        if state.sampler_state is not None:
            random.setstate(state.sampler_state)
        return P.state_to_record(state.client_weights)

    def _config(
        self,
        settings: StepSettings,
        extra: ConfigRecord | None,
        entries: Mapping[str, int | list[int]],
    ) -> ConfigRecord:
        config = P.settings_to_config(settings)
        for key, value in (extra or {}).items():
            if key in P.PROTOCOL_KEYS:
                raise ValueError(
                    f"train_config/evaluate_config key {key!r} is reserved by the split "
                    f"protocol; rename it (reserved: {', '.join(P.PROTOCOL_KEYS)})"
                )
            config[key] = value
        for key, value in entries.items():
            config[key] = value
        return config

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        num_rounds: int,
        arrays: ArrayRecord,
        timeout: float,
        train_config: ConfigRecord | None = None,
    ) -> tuple[ArrayRecord | None, dict[str, float], MetricRecord | None]:
        """One round: begin, the per-block exchange, end and FedAvg. Failed nodes are dropped."""
        base = scaled_lr(self.base_lr, self.batch_size, self.lr_scaling)
        lr = lr_at_round(base, self.lr_schedule, server_round, num_rounds)
        self.server.set_lr(lr)
        offset = sum(int(row["steps"]) for row in self.rows)
        settings = self.settings(server_round, lr, step_offset=offset)
        link = link_for(settings)
        acc = RoundAccumulator(server_round, lr)
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        acc.num_clients = len(node_ids)
        first = first_block(self.steps_per_round, self.steps_per_message)
        begin = RecordDict(
            {
                self.arrayrecord_key: arrays,
                self.configrecord_key: self._config(
                    settings,
                    train_config,
                    {P.STEP: 0, P.NUM_BATCHES: first, P.CURSORS: P.cursor_table(self.cursors)},
                ),
            }
        )
        replies = self._exchange(
            grid, _broadcast(begin, node_ids, P.SPLIT_BEGIN, server_round), timeout, acc
        )
        if not replies:
            log.warning(
                "Round %d: no client answered %s; round skipped", server_round, P.SPLIT_BEGIN
            )
            acc.num_clients = 0
            return None, acc.row(), None
        steps = self.steps_per_round or min(
            int(_metric(r, P.NUM_EXAMPLES, 0)) // self.batch_size for r in replies.values()
        )
        blocks = plan_blocks(max(steps, 1), self.steps_per_message, first)
        progress = StepProgress(f"Round {server_round}", sum(blocks))
        step = 0
        for index, count in enumerate(blocks):
            uploads = self._uploads(replies, acc)
            tic = time.perf_counter()
            block = self.server.run_block(link, settings, uploads, step, count)
            acc.server_seconds += time.perf_counter() - tic
            for node, reason in block.dropped.items():
                log.warning(
                    "Node %d sent an unusable upload (%s); dropped from the round", node, reason
                )
            acc.losses.extend(block.losses)
            step += count
            if block.losses:
                progress.update(step, block.losses[-1])
            last = index == len(blocks) - 1
            config = self._config(
                settings,
                train_config,
                {P.STEP: step, P.NUM_BATCHES: 0 if last else blocks[index + 1]},
            )
            messages = {}
            for node, blobs in block.gradients.items():
                acc.downlink(blobs)
                content = RecordDict(
                    {self.configrecord_key: config, P.GRADIENT: P.gradient_record(blobs)}
                )
                messages[node] = Message(
                    content,
                    dst_node_id=node,
                    message_type=P.SPLIT_END if last else P.SPLIT_STEP,
                    group_id=str(server_round),
                )
            replies = self._exchange(grid, messages, timeout, acc) if messages else {}
            if not replies:
                log.warning("Round %d: every client dropped out at step %d", server_round, step)
                break
        row = acc.row()
        if not replies or len(acc.losses) < sum(blocks):
            return None, row, None
        ordered = [replies[n] for n in _by_client_id(replies)]
        for reply in ordered:
            cursor = P.read_cursor(reply.content.metric_records.get(P.METRICS, MetricRecord()))
            if cursor is not None:
                self.cursors[int(_metric(reply, P.CLIENT_ID))] = cursor
        new_arrays, train_metrics = self.aggregate_train(server_round, ordered)
        return new_arrays, row, train_metrics

    def _uploads(
        self, replies: Mapping[int, Message], acc: RoundAccumulator
    ) -> dict[int, ClientUpload]:
        """The clients' uploads, with their costs counted; unreadable replies are dropped."""
        uploads = {}
        for node, reply in replies.items():
            try:
                upload = P.read_smashed(reply.content, int(_metric(reply, P.CLIENT_ID, node)))
            except ValueError as err:
                log.warning(
                    "Node %d sent an unreadable reply (%s); dropped from the round", node, err
                )
                continue
            acc.uplink(upload)
            uploads[node] = upload
        acc.client_seconds += max(
            (_metric(replies[n], P.CLIENT_SECONDS, 0.0) for n in uploads), default=0.0
        )
        return uploads

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the client weights, in the clients' own dtypes; client ids are not averaged."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        reference = next(
            (next(iter(r.content.array_records.values())) for r in replies if not r.has_error()),
            None,
        )
        if arrays is not None and reference is not None:
            arrays = cast_like(arrays, reference)
        for key in P.CLIENT_ONLY_METRICS:
            if metrics is not None and key in metrics:
                del metrics[key]
        return arrays, metrics

    def federated_evaluate(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        evaluate_config: ConfigRecord | None = None,
    ) -> MetricRecord | None:
        """Clients send compressed activations of their local test splits; the server scores.

        Per-client scores are aggregated with ``evaluate_metrics_aggr_fn`` (weighted by
        ``num-examples``).
        """
        if self.fraction_evaluate == 0.0:
            return None
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        settings = self.settings(server_round, 0.0, train=False)
        config = self._config(settings, evaluate_config, {P.MAX_EXAMPLES: self.eval_max_examples})
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        replies = self._exchange(
            grid, _broadcast(content, node_ids, P.SPLIT_EVALUATE, server_round), timeout
        )
        link = link_for(settings)
        scored, examples = [], 0
        for node, reply in replies.items():
            try:
                upload = P.read_smashed(reply.content)
                scores = self.server.score_uploads(link, [upload])
            except ValueError as err:
                log.warning("Node %d sent an unusable evaluation reply (%s); ignored", node, err)
                continue
            if scores["num-examples"]:
                examples += int(scores["num-examples"])
                scored.append(RecordDict({P.METRICS: MetricRecord(scores)}))  # type: ignore[arg-type]
        if not scored:
            return None
        aggregated = self.evaluate_metrics_aggr_fn(scored, self.weighted_by_key)
        if P.NUM_EXAMPLES not in aggregated:
            aggregated[P.NUM_EXAMPLES] = examples
        return aggregated

    # -- messaging ----------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample nodes as FedAvg does: a fraction of those connected, at least ``minimum``."""
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait)
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return sorted(node_ids)

    def _exchange(
        self,
        grid: Grid,
        messages: Mapping[int, Message],
        timeout: float,
        acc: RoundAccumulator | None = None,
    ) -> dict[int, Message]:
        """Push one message per node, poll for the replies; drop nodes that fail or time out.

        The wait adapts to the observed reply times (see :class:`AdaptiveWait`); ``timeout``
        is its ceiling.
        """
        nodes = list(messages)
        pushed = time.monotonic()
        ids = list(grid.push_messages([messages[n] for n in nodes]))
        ids += [""] * (len(nodes) - len(ids))  # the grid returns one id per message, in order
        waiting = {mid: node for node, mid in zip(nodes, ids, strict=True) if mid}
        for node, mid in zip(nodes, ids, strict=True):
            if not mid:
                log.warning("Node %d: message could not be pushed; dropped from the round", node)
        replies: dict[int, Message] = {}
        failures: dict[int, str] = {}
        budget = min(timeout, self.wait.budget())
        deadline = time.monotonic() + budget  # counted from the end of the push
        pause = self.poll_interval
        while waiting:  # pulls at least once, however long the push took
            got = list(grid.pull_messages(list(waiting)))
            for reply in got:
                if reply.metadata.reply_to_message_id not in waiting:
                    continue
                node = waiting.pop(reply.metadata.reply_to_message_id)
                self.wait.observe(time.monotonic() - pushed)
                if reply.has_error():
                    failures[node] = str(reply.error.reason)
                else:
                    replies[node] = reply
            if not waiting or time.monotonic() >= deadline:
                break
            if got:
                pause = self.poll_interval
            else:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.1)
        _report_failures(failures, replies, len(nodes))
        for node in waiting.values():
            log.warning("Node %d did not answer within %.1fs; dropped from the round", node, budget)
        if acc is not None:
            elapsed = time.monotonic() - pushed
            compute = max(
                (_metric(r, P.CLIENT_SECONDS, 0.0) for r in replies.values()), default=0.0
            )
            acc.message_seconds += max(elapsed - compute, 0.0)
        return replies


def wait_for_nodes(grid: Grid, minimum: int, wait: float) -> int:
    """Wait up to ``wait`` seconds for ``minimum`` connected nodes; returns how many connected.

    Raises :class:`NotEnoughNodesError` saying how to start more, instead of waiting forever.
    """
    deadline = time.monotonic() + wait
    connected = len(list(grid.get_node_ids()))
    while connected < minimum:
        if time.monotonic() >= deadline:
            raise NotEnoughNodesError(
                f"{connected} node(s) connected after waiting {wait:g}s, the run needs {minimum} "
                "(min-nodes): start more SuperNodes, or in simulation run with "
                '--federation-config "num-supernodes=N", or lower min-nodes'
            )
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        connected = len(list(grid.get_node_ids()))
    return connected


def _report_failures(
    failures: Mapping[int, str], replies: Mapping[int, Message], sent: int
) -> None:
    """One warning per kind of failure; stop the run when every node failed the same way."""
    if not failures:
        return
    kinds: dict[str, list[int]] = {}
    for node in sorted(failures):
        kinds.setdefault(P.failure_kind(failures[node]), []).append(node)
    if not replies and len(failures) == sent and len(kinds) == 1:
        raise ClientsFailedError(
            f"all {sent} clients failed the same way, so the run stops: {failures[min(failures)]}"
        )
    for nodes in kinds.values():
        log.warning(
            "Node%s %s failed (%s); dropped from the round",
            "s" if len(nodes) > 1 else "",
            ", ".join(map(str, nodes)),
            failures[nodes[0]],
        )


def _broadcast(
    content: RecordDict, node_ids: Iterable[int], message_type: str, server_round: int
) -> dict[int, Message]:
    """One message with the same content per node, grouped by round."""
    return {
        node: Message(
            content, dst_node_id=node, message_type=message_type, group_id=str(server_round)
        )
        for node in node_ids
    }


def _scalar(record: Mapping[str, Any], key: str, default: float = math.nan) -> float:
    """A scalar entry of a MetricRecord (``default`` when absent or not a number)."""
    value = record.get(key, default)
    return float(value) if isinstance(value, int | float) else default


def _metric(reply: Message, key: str, default: float = math.nan) -> float:
    """A scalar metric of a client's reply."""
    metrics = reply.content.metric_records.get(P.METRICS, MetricRecord())
    return _scalar(metrics, key, default)


def _by_client_id(replies: Mapping[int, Message]) -> list[int]:
    """Node ids ordered by the clients' partition ids (the local engine's order)."""
    return sorted(replies, key=lambda node: _metric(replies[node], P.CLIENT_ID))
