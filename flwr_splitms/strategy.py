"""MSSplitStrategy: the server side of SplitFed over Flower's Message API.

Flower's ClientApps only answer, so the strategy drives every step of a round: it decodes the
sampled clients' compressed activations, runs the server-side model, takes one optimizer step and
sends each client the gradient w.r.t. its decoded activations in the message that also asks for the
next batch (one round trip per step). At round end the client-side weights are averaged with
FedAvg's own aggregation. Steps are driven with ``push_messages`` and a short polling loop:
``send_and_receive`` of the HTTP grid sleeps 3 s between pulls, far longer than a step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
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
from flwr_splitms.client import StepSettings
from flwr_splitms.codecs import Codec, decode_bytes, get_codec
from flwr_splitms.config import LR_SCHEDULES, SplitConfig
from flwr_splitms.data import BatchSource
from flwr_splitms.history import HISTORY_COLUMNS

log = logging.getLogger("flwr")


@dataclass
class SplitResult(Result):
    """Flower's ``Result`` plus the per-round metrics as a DataFrame (see HISTORY_COLUMNS)."""

    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))


def lr_at_round(base_lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """Learning rate of a round: constant, cosine from ``base_lr`` to 0, or x0.1 at 50% and 75%."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    progress = (server_round - 1) / max(num_rounds, 1)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return base_lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    return base_lr


@dataclass
class StepOutcome:
    """What one server step produced."""

    gradients: list[torch.Tensor]
    loss: float
    client_losses: list[float]


def server_step(
    server_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: list[torch.Tensor],
    labels: list[torch.Tensor],
) -> StepOutcome:
    """One SplitFed server step on the clients' decoded activations (paper Eq. 1).

    The server loss is the mean over clients of each client's mean loss. Each client gets the
    gradient of its own mean loss w.r.t. its decoded activations (identity through the codec,
    paper Lemma 2), so its update has the scale of ordinary SGD on its own batch.
    """
    device = next(server_net.parameters()).device
    inputs = [a.detach().to(device).float().requires_grad_(True) for a in activations]
    server_net.train()
    logits = server_net(torch.cat(inputs))
    targets = torch.cat([y.to(device) for y in labels])
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    client_losses = [part.mean() for part in per_sample.split([len(y) for y in labels])]
    loss = torch.stack(client_losses).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    count = len(inputs)
    gradients = [
        (_grad(x) * count).to(dtype=a.dtype, device="cpu")
        for x, a in zip(inputs, activations, strict=True)
    ]
    return StepOutcome(gradients, float(loss.detach()), [float(c.detach()) for c in client_losses])


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    if leaf.grad is None:
        raise RuntimeError("the server model does not depend on the activations it was given")
    return leaf.grad


def score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Summed cross-entropy, top-1 hits and top-5 hits of a batch."""
    loss = float(F.cross_entropy(logits, labels, reduction="sum"))
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels.unsqueeze(1)
    return loss, int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def summarize(loss: float, top1: int, top5: int, count: int) -> dict[str, float]:
    """Turn summed scores into mean loss and accuracies (NaN when nothing was scored)."""
    if count == 0:
        return {"loss": math.nan, "accuracy": math.nan, "top5": math.nan, "num-examples": 0}
    return {
        "loss": loss / count,
        "accuracy": top1 / count,
        "top5": top5 / count,
        "num-examples": count,
    }


@torch.no_grad()
def evaluate_split(
    client_net: nn.Module,
    server_net: nn.Module,
    codec: Codec,
    data: BatchSource,
    *,
    batch_size: int = 256,
    max_examples: int = 0,
) -> dict[str, float]:
    """Inference through client net, codec and server net, as a deployment would run it."""
    client_net.eval()
    server_net.eval()
    client_device = next(client_net.parameters()).device
    server_device = next(server_net.parameters()).device
    total = len(data) if max_examples <= 0 else min(max_examples, len(data))
    loss, top1, top5 = 0.0, 0, 0
    for start in range(0, total, batch_size):
        x, y = data.batch(torch.arange(start, min(start + batch_size, total)), augment=False)
        activations = client_net(x.to(client_device))
        decoded = codec.decode(codec.encode(activations, train=False)).to(server_device)
        batch = score(server_net(decoded.float()), y.to(server_device))
        loss, top1, top5 = loss + batch[0], top1 + batch[1], top5 + batch[2]
    return summarize(loss, top1, top5, total)


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


class StepProgress:
    """Logs a progress line about every ``interval`` seconds during a long round."""

    def __init__(self, label: str, total: int, interval: float = 30.0) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.started = self.last = time.monotonic()

    def update(self, step: int, loss: float) -> None:
        """Report step ``step`` (1-based) if the interval has passed."""
        now = time.monotonic()
        if now - self.last >= self.interval and step < self.total:
            self.last = now
            rate = step / (now - self.started)
            log.info(
                "%s: step %d/%d, loss %.4f, about %.0fs left",
                self.label,
                step,
                self.total,
                loss,
                (self.total - step) / rate,
            )


class MSSplitStrategy(FedAvg):
    """SplitFed with compressed cut-layer activations, as a Flower ``FedAvg`` strategy.

    It holds the server-side model, its SGD optimizer and LR schedule, and the codec the clients
    use for their activations. ``start`` runs the rounds and returns a :class:`SplitResult`;
    ``history`` holds the per-round metrics as a DataFrame. Remaining keyword arguments go to
    ``FedAvg`` (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``, ...).
    """

    def __init__(
        self,
        server_model: nn.Module,
        *,
        codec: str = "ms",
        codec_params: Mapping[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_schedule: str = "cosine",
        batch_size: int = 64,
        steps_per_round: int = 0,
        augment: bool = True,
        seed: int = 0,
        device: str = "cpu",
        eval_batch_size: int = 256,
        eval_max_examples: int = 0,
        poll_interval: float = 0.01,
        **fedavg_kwargs: Any,
    ) -> None:
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**fedavg_kwargs)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if batch_size < 1 or steps_per_round < 0:
            raise ValueError("batch_size must be >= 1 and steps_per_round >= 0")
        self.codec_name = codec
        self.codec_params = dict(codec_params or {})
        self.codec = get_codec(codec, **self.codec_params)  # fails early on a bad choice
        self.device = torch.device(device)
        self.server_model = server_model.to(self.device)
        self.optimizer = torch.optim.SGD(
            self.server_model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.base_lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.lr_schedule = lr_schedule
        self.batch_size = batch_size
        self.steps_per_round = steps_per_round
        self.augment = augment
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.eval_max_examples = eval_max_examples
        self.poll_interval = poll_interval
        self.rows: list[dict[str, float]] = []
        self.round_callbacks: list[Callable[[int, ArrayRecord, dict[str, float]], None]] = []

    @classmethod
    def from_config(
        cls, config: SplitConfig, server_model: nn.Module, **kwargs: Any
    ) -> MSSplitStrategy:
        """Build from a :class:`SplitConfig` (the example app's run-config)."""
        settings: dict[str, Any] = {
            "codec": config.codec,
            "codec_params": config.codec_params,
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "lr_schedule": config.lr_schedule,
            "batch_size": config.batch_size,
            "steps_per_round": config.steps_per_round,
            "augment": config.augment,
            "seed": config.seed,
            "eval_batch_size": config.eval_batch_size,
            "eval_max_examples": config.eval_max_examples,
            "fraction_train": config.fraction_train,
            "fraction_evaluate": config.fraction_evaluate,
        }
        settings.update(kwargs)
        return cls(server_model, **settings)

    @property
    def history(self) -> pd.DataFrame:
        """Per-round metrics so far (one row per round, columns HISTORY_COLUMNS and more)."""
        return pd.DataFrame(
            self.rows, columns=list(dict.fromkeys([*HISTORY_COLUMNS, *self._extra_columns()]))
        )

    def _extra_columns(self) -> list[str]:
        return [k for row in self.rows for k in row if k not in HISTORY_COLUMNS]

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log.info(
            "\t└──> Split: codec %s %s | lr %s (%s) | batch %d | steps/round %s",
            self.codec_name,
            self.codec_params,
            self.base_lr,
            self.lr_schedule,
            self.batch_size,
            self.steps_per_round or "one epoch",
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
    ) -> SplitResult:
        """Run ``num_rounds`` SplitFed rounds; ``timeout`` bounds each step's wait for replies."""
        log.info("Starting %s: %d rounds", type(self).__name__, num_rounds)
        self.summary()
        result = SplitResult()
        result.arrays = initial_arrays
        if evaluate_fn is not None:
            initial = evaluate_fn(0, initial_arrays)
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
                log.info("Initial evaluation: %s", _fmt(initial))
        arrays = initial_arrays
        for server_round in range(1, num_rounds + 1):
            started = time.perf_counter()
            new_arrays, row, train_metrics = self.train_round(
                grid, server_round, num_rounds, arrays, timeout
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
            row["round_seconds"] = time.perf_counter() - started
            self.rows.append(row)
            log.info(
                "[ROUND %d/%d] train loss %.4f | test acc %s | uplink %s (raw %s) | %d clients, "
                "%d steps, %.1fs",
                server_round,
                num_rounds,
                row.get("train_loss", math.nan),
                _pct(row.get("test_accuracy", math.nan)),
                _mb(row.get("uplink_bytes", 0)),
                _mb(row.get("uplink_raw_bytes", 0)),
                int(row.get("num_clients", 0)),
                int(row.get("steps", 0)),
                row["round_seconds"],
            )
            for callback in self.round_callbacks:
                callback(server_round, arrays, row)
        result.history = self.history
        return result

    def train_round(
        self,
        grid: Grid,
        server_round: int,
        num_rounds: int,
        arrays: ArrayRecord,
        timeout: float,
    ) -> tuple[ArrayRecord | None, dict[str, float], MetricRecord | None]:
        """One round: begin, per-step exchange, end and FedAvg. Failed nodes are dropped."""
        lr = lr_at_round(self.base_lr, self.lr_schedule, server_round, num_rounds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        settings = StepSettings(
            server_round=server_round,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=self.seed,
            augment=self.augment,
            codec_name=self.codec_name,
            codec_params=self.codec_params,
        )
        config = settings.to_config()
        row: dict[str, float] = {"round": server_round, "lr": lr}
        totals = dict.fromkeys(
            (
                "uplink_bytes",
                "uplink_raw_bytes",
                "downlink_bytes",
                "client_seconds",
                "server_seconds",
                "message_seconds",
            ),
            0.0,
        )
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        begin = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        wall = time.perf_counter()
        replies = self._exchange(
            grid, _broadcast(begin, node_ids, P.SPLIT_BEGIN, server_round), timeout
        )
        totals["message_seconds"] += time.perf_counter() - wall
        if not replies:
            log.warning(
                "Round %d: no client answered %s; round skipped", server_round, P.SPLIT_BEGIN
            )
            row.update(totals, steps=0, num_clients=0)
            return None, row, None
        steps = self.steps_per_round or min(
            int(_metric(r, P.NUM_EXAMPLES, 0)) // self.batch_size for r in replies.values()
        )
        steps = max(steps, 1)
        losses, errors = [], []
        progress = StepProgress(f"Round {server_round}", steps)
        for step in range(1, steps + 1):
            order = _by_client_id(replies)
            activations, labels = [], []
            for node in order:
                blob, y = P.read_smashed(replies[node].content)
                totals["uplink_bytes"] += len(blob)
                totals["uplink_raw_bytes"] += _metric(replies[node], "raw-bytes", 0.0)
                errors.append(_metric(replies[node], "compression-error"))
                activations.append(decode_bytes(blob))
                labels.append(y)
            totals["client_seconds"] += max(
                _metric(replies[n], P.CLIENT_SECONDS, 0.0) for n in order
            )
            tic = time.perf_counter()
            outcome = server_step(self.server_model, self.optimizer, activations, labels)
            totals["server_seconds"] += time.perf_counter() - tic
            losses.append(outcome.loss)
            progress.update(step, outcome.loss)
            last = step == steps
            step_config = ConfigRecord({**dict(config), P.STEP: step})
            messages = {}
            for node, gradient in zip(order, outcome.gradients, strict=True):
                totals["downlink_bytes"] += gradient.numel() * gradient.element_size()
                content = RecordDict(
                    {
                        P.CONFIG: step_config,
                        P.GRADIENT: ArrayRecord({"gradient": P.tensor_array(gradient)}),
                    }
                )
                messages[node] = Message(
                    content,
                    dst_node_id=node,
                    message_type=P.SPLIT_END if last else P.SPLIT_STEP,
                    group_id=str(server_round),
                )
            wall = time.perf_counter()
            replies = self._exchange(grid, messages, timeout)
            elapsed = time.perf_counter() - wall
            if not last:
                elapsed -= max(
                    (_metric(r, P.CLIENT_SECONDS, 0.0) for r in replies.values()),
                    default=0.0,
                )
            totals["message_seconds"] += max(elapsed, 0.0)
            if not replies:
                log.warning("Round %d: every client dropped out at step %d", server_round, step)
                break
        row.update(totals)
        row.update(
            train_loss=float(np.mean(losses)) if losses else math.nan,
            compression_error=float(np.nanmean(errors)) if errors else math.nan,
            steps=len(losses),
            num_clients=len(node_ids),
        )
        if not replies or len(losses) < steps:
            return None, row, None
        ordered = [replies[n] for n in _by_client_id(replies)]
        new_arrays, train_metrics = self.aggregate_train(server_round, ordered)
        return new_arrays, row, train_metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the client weights, in the clients' own dtypes; client ids are not averaged."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        reference = next(
            (r.content.array_records[P.ARRAYS] for r in replies if not r.has_error()), None
        )
        if arrays is not None and reference is not None:
            arrays = cast_like(arrays, reference)
        if metrics is not None and P.CLIENT_ID in metrics:
            del metrics[P.CLIENT_ID]
        return arrays, metrics

    def federated_evaluate(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        timeout: float,
        evaluate_config: ConfigRecord | None = None,
    ) -> MetricRecord | None:
        """Clients send compressed activations of their local test splits; the server scores."""
        if self.fraction_evaluate == 0.0:
            return None
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        settings = StepSettings(  # inference: no optimizer settings, no augmentation
            server_round=server_round,
            lr=0.0,
            momentum=0.0,
            weight_decay=0.0,
            batch_size=self.eval_batch_size,
            seed=self.seed,
            augment=False,
            codec_name=self.codec_name,
            codec_params=self.codec_params,
        )
        config = settings.to_config()
        config["max-examples"] = self.eval_max_examples
        for key, value in (evaluate_config or {}).items():
            config[key] = value
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        replies = self._exchange(
            grid, _broadcast(content, node_ids, P.SPLIT_EVALUATE, server_round), timeout
        )
        loss, top1, top5, count = 0.0, 0, 0, 0
        self.server_model.eval()
        with torch.no_grad():
            for reply in replies.values():
                record = reply.content.array_records[P.SMASHED]
                for key in record:
                    if not key.startswith("activations."):
                        continue
                    index = key.split(".", 1)[1]
                    x = decode_bytes(P.payload_bytes(record[key])).to(self.device).float()
                    y = P.array_tensor(record[f"labels.{index}"]).long().to(self.device)
                    batch = score(self.server_model(x), y)
                    loss, top1, top5, count = (
                        loss + batch[0],
                        top1 + batch[1],
                        top5 + batch[2],
                        count + len(y),
                    )
        if count == 0:
            return None
        return MetricRecord(summarize(loss, top1, top5, count))  # type: ignore[arg-type]

    # -- messaging ----------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample nodes as FedAvg does: a fraction of those connected, at least ``minimum``."""
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return sorted(node_ids)

    def _exchange(
        self, grid: Grid, messages: Mapping[int, Message], timeout: float
    ) -> dict[int, Message]:
        """Push one message per node, poll for the replies; drop nodes that fail or time out."""
        nodes = list(messages)
        ids = list(grid.push_messages([messages[n] for n in nodes]))
        ids += [""] * (len(nodes) - len(ids))  # the grid returns one id per message, in order
        waiting = {mid: node for node, mid in zip(nodes, ids, strict=True) if mid}
        for node, mid in zip(nodes, ids, strict=True):
            if not mid:
                log.warning("Node %d: message could not be pushed; dropped from the round", node)
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        pause = self.poll_interval
        while waiting and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(waiting)))
            for reply in got:
                if reply.metadata.reply_to_message_id not in waiting:
                    continue
                node = waiting.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    log.warning(
                        "Node %d failed (%s); dropped from the round", node, reply.error.reason
                    )
                else:
                    replies[node] = reply
            if waiting and not got:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.1)
            elif got:
                pause = self.poll_interval
        for node in waiting.values():
            log.warning(
                "Node %d did not answer within %.0fs; dropped from the round", node, timeout
            )
        return replies


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


def _metrics(reply: Message) -> MetricRecord:
    return reply.content.metric_records[P.METRICS]


def _scalar(record: Mapping[str, Any], key: str, default: float = math.nan) -> float:
    """A scalar entry of a MetricRecord (``default`` when absent or not a number)."""
    value = record.get(key, default)
    return float(value) if isinstance(value, int | float) else default


def _metric(reply: Message, key: str, default: float = math.nan) -> float:
    """A scalar metric of a client's reply."""
    return _scalar(_metrics(reply), key, default)


def _by_client_id(replies: Mapping[int, Message]) -> list[int]:
    """Node ids ordered by the clients' partition ids (the local engine's order)."""
    return sorted(replies, key=lambda node: _metric(replies[node], P.CLIENT_ID))


def _fmt(record: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"
