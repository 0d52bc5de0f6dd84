"""The ClientApp side of the split protocol.

A client holds the first part of the network. Per step it sends the compressed activations of one
batch and, one message later, receives the gradient w.r.t. the decoded activations. Between
messages a node keeps only ``context.state``, so the autograd graph cannot survive: the backward
pass recomputes the forward of the same batch (same indices, same augmentation draws) and puts the
BatchNorm running statistics back, so each batch updates them exactly once.

:class:`SplitClientCore` is that math without Flower (the local engine uses it too);
:class:`SplitClient` wires it to a Flower ``ClientApp``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from flwr_splitms import protocol as P
from flwr_splitms.codecs import Codec, compression_error, get_codec
from flwr_splitms.data import BatchSource
from flwr_splitms.seeding import generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """What the strategy tells a client with every training message."""

    server_round: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    seed: int
    augment: bool
    codec_name: str
    codec_params: dict[str, Any]

    def to_config(self) -> ConfigRecord:
        """The ConfigRecord form that travels in a message."""
        return ConfigRecord(
            {
                P.ROUND: self.server_round,
                P.LR: self.lr,
                P.MOMENTUM: self.momentum,
                P.WEIGHT_DECAY: self.weight_decay,
                P.BATCH_SIZE: self.batch_size,
                P.SEED: self.seed,
                P.AUGMENT: self.augment,
                P.CODEC: P.codec_spec(self.codec_name, self.codec_params),
            }
        )

    @classmethod
    def from_config(cls, config: ConfigRecord) -> StepSettings:
        """Parse the ConfigRecord of a split message."""
        name, params = P.parse_codec_spec(str(P.config_value(config, P.CODEC)))
        return cls(
            server_round=P.config_int(config, P.ROUND),
            lr=float(P.config_value(config, P.LR)),
            momentum=float(P.config_value(config, P.MOMENTUM)),
            weight_decay=float(P.config_value(config, P.WEIGHT_DECAY)),
            batch_size=P.config_int(config, P.BATCH_SIZE),
            seed=P.config_int(config, P.SEED),
            augment=bool(P.config_value(config, P.AUGMENT)),
            codec_name=name,
            codec_params=params,
        )


@dataclass
class ClientState:
    """Everything a client carries from one message to the next."""

    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    position: int = 0
    # The batch whose gradient is awaited: (epoch, position, round, step); None when idle.
    pending: tuple[int, int, int, int] | None = None

    def to_records(self) -> dict[str, ArrayRecord | ConfigRecord]:
        """The records this state occupies in ``context.state``."""
        cursor = ConfigRecord({"epoch": self.epoch, "position": self.position})
        if self.pending is not None:
            keys = ("pending-epoch", "pending-position", "pending-round", "pending-step")
            for key, value in zip(keys, self.pending, strict=True):
                cursor[key] = value
        return {
            P.STATE_WEIGHTS: P.state_to_record(self.weights),
            P.STATE_OPTIMIZER: P.state_to_record(self.momentum),
            P.STATE_CURSOR: cursor,
        }

    @classmethod
    def from_records(cls, state: RecordDict) -> ClientState | None:
        """Read back what :meth:`to_records` stored; None on a node's first message."""
        if P.STATE_WEIGHTS not in state:
            return None
        cursor = state.config_records[P.STATE_CURSOR]
        pending = None
        if "pending-epoch" in cursor:
            pending = (
                P.config_int(cursor, "pending-epoch"),
                P.config_int(cursor, "pending-position"),
                P.config_int(cursor, "pending-round"),
                P.config_int(cursor, "pending-step"),
            )
        return cls(
            weights=P.record_to_state(state.array_records[P.STATE_WEIGHTS]),
            momentum=P.record_to_state(state.array_records[P.STATE_OPTIMIZER]),
            epoch=P.config_int(cursor, "epoch"),
            position=P.config_int(cursor, "position"),
            pending=pending,
        )


@dataclass
class EncodedBatch:
    """One batch's uplink: payload bytes, labels, and what it cost."""

    blob: bytes
    labels: torch.Tensor
    raw_nbytes: int
    error: float


def take_batch(
    size: int, batch_size: int, epoch: int, position: int, client_id: int = 0
) -> tuple[int, int]:
    """Where the next full batch starts: (epoch, position); a short epoch tail is dropped."""
    if size < batch_size:
        raise ValueError(
            f"client {client_id} holds {size} training examples, fewer than batch-size "
            f"{batch_size}; lower batch-size or use fewer partitions"
        )
    if position + batch_size > size:
        return epoch + 1, 0
    return epoch, position


def batch_positions(
    size: int, batch_size: int, seed: int, client_id: int, epoch: int, position: int
) -> torch.Tensor:
    """Positions of a batch in the client's data: a per-(seed, client, epoch) shuffle."""
    order = torch.randperm(size, generator=generator(seed, "order", client_id, epoch))
    return order[position : position + batch_size]


def augment_generator(seed: int, client_id: int, server_round: int, step: int) -> torch.Generator:
    """Draws of a batch's augmentation, the same when the batch is recomputed."""
    return generator(seed, "augment", client_id, server_round, step)


def codec_generator(seed: int, client_id: int, server_round: int, step: int) -> torch.Generator:
    """Draws of a randomized codec (RT) for one batch."""
    return generator(seed, "codec", client_id, server_round, step)


@contextlib.contextmanager
def _scratch_buffers(model: nn.Module) -> Iterator[None]:
    """Run the body on copies of the module's buffers and put the originals back afterwards.

    Re-binding (not copying into) the buffers leaves the autograd graph of the body intact.
    """
    saved = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                saved.append((module, name, buffer))
                module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in saved:
            module._buffers[name] = buffer


class SplitClientCore:
    """The client half of SplitFed for one participant, free of Flower.

    ``client_id`` identifies the participant in the derived seeds (its partition id), so a
    recomputed batch and the local engine see the same data order and augmentation.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        test_data: BatchSource | None = None,
        *,
        client_id: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.client_id = client_id
        self._codecs: dict[str, Codec] = {}

    # -- state --------------------------------------------------------------------------------
    def start_round(
        self, global_weights: Mapping[str, torch.Tensor], previous: ClientState | None
    ) -> ClientState:
        """The state at a round's start: global weights, this client's cursor and momentum."""
        state = ClientState(weights={k: v.clone() for k, v in global_weights.items()})
        if previous is not None:
            state.momentum = previous.momentum
            state.epoch, state.position = previous.epoch, previous.position
        return state

    def _load(self, state: ClientState) -> None:
        self.model.load_state_dict(state.weights)

    def _save(self, state: ClientState) -> None:
        state.weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def codec(self, settings: StepSettings) -> Codec:
        """The codec the strategy asked for (built once per distinct choice)."""
        key = P.codec_spec(settings.codec_name, settings.codec_params)
        if key not in self._codecs:
            self._codecs[key] = get_codec(settings.codec_name, **settings.codec_params)
        return self._codecs[key]

    # -- data order ---------------------------------------------------------------------------
    def _advance(self, state: ClientState, batch_size: int) -> tuple[int, int]:
        """Take the next full batch of the epoch, returning its (epoch, position)."""
        epoch, position = take_batch(
            len(self.train_data), batch_size, state.epoch, state.position, self.client_id
        )
        state.epoch, state.position = epoch, position + batch_size
        return epoch, position

    def _inputs(
        self, settings: StepSettings, epoch: int, position: int, server_round: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = batch_positions(
            len(self.train_data),
            settings.batch_size,
            settings.seed,
            self.client_id,
            epoch,
            position,
        )
        aug = augment_generator(settings.seed, self.client_id, server_round, step)
        x, y = self.train_data.batch(positions, augment=settings.augment, generator=aug)
        return x.to(self.device), y

    # -- the protocol's two halves ------------------------------------------------------------
    def forward(self, state: ClientState, settings: StepSettings, step: int) -> EncodedBatch:
        """Forward the next batch (updating BatchNorm statistics) and compress the activations."""
        self._load(state)
        epoch, position = self._advance(state, settings.batch_size)
        x, y = self._inputs(settings, epoch, position, settings.server_round, step)
        self.model.train()
        with torch.no_grad():
            activations = self.model(x)
        codec = self.codec(settings)
        rng = codec_generator(settings.seed, self.client_id, settings.server_round, step)
        payload = codec.encode(activations, generator=rng, train=True)
        error = compression_error(activations.cpu(), codec.decode(payload))
        self._save(state)
        state.pending = (epoch, position, settings.server_round, step)
        return EncodedBatch(payload.to_bytes(), y, payload.raw_nbytes, error)

    def backward(self, state: ClientState, settings: StepSettings, gradient: torch.Tensor) -> None:
        """Apply the server's gradient to the pending batch: recompute, backprop, SGD step."""
        if state.pending is None:
            raise ValueError(
                f"client {self.client_id} got a gradient but has no pending batch; the "
                "strategy's messages arrived out of order"
            )
        epoch, position, server_round, step = state.pending
        self._load(state)
        x, _ = self._inputs(settings, epoch, position, server_round, step)
        self.model.train()
        with _scratch_buffers(self.model):  # this batch already updated the running stats once
            activations = self.model(x)
        if gradient.shape != activations.shape:
            raise ValueError(
                f"gradient of shape {tuple(gradient.shape)} does not match the activations "
                f"{tuple(activations.shape)} of client {self.client_id}"
            )
        optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        named = dict(self.model.named_parameters())
        for name, buf in state.momentum.items():
            if name in named:
                optimizer.state[named[name]]["momentum_buffer"] = buf.to(self.device).clone()
        optimizer.zero_grad(set_to_none=True)
        activations.backward(gradient.to(device=self.device, dtype=activations.dtype))
        optimizer.step()
        state.momentum = {
            name: optimizer.state[p]["momentum_buffer"].detach().cpu().clone()
            for name, p in named.items()
            if optimizer.state[p].get("momentum_buffer") is not None
        }
        self._save(state)
        state.pending = None

    def evaluate(
        self, weights: Mapping[str, torch.Tensor], settings: StepSettings, max_examples: int = 0
    ) -> list[EncodedBatch]:
        """Compressed activations of the local test split, in inference mode."""
        if self.test_data is None or len(self.test_data) == 0:
            return []
        self.model.load_state_dict(dict(weights))
        self.model.eval()
        codec = self.codec(settings)
        total = len(self.test_data) if max_examples <= 0 else min(max_examples, len(self.test_data))
        batches = []
        with torch.no_grad():
            for start in range(0, total, settings.batch_size):
                positions = torch.arange(start, min(start + settings.batch_size, total))
                x, y = self.test_data.batch(positions, augment=False)
                activations = self.model(x.to(self.device))
                payload = codec.encode(activations, train=False)
                batches.append(EncodedBatch(payload.to_bytes(), y, payload.raw_nbytes, 0.0))
        return batches


# ---------------------------------------------------------------------------------------------
# Flower wiring
# ---------------------------------------------------------------------------------------------
ModelFn = Callable[[Context], nn.Module]
DataFn = Callable[[Context], tuple[BatchSource, BatchSource | None]]


def client_id_of(context: Context) -> int:
    """The participant's stable id: its ``partition-id`` when the node has one, else node id."""
    partition = context.node_config.get("partition-id")
    return int(partition) if partition is not None else int(context.node_id)


class SplitClient:
    """Registers the split protocol's handlers on a ``ClientApp``.

    ``model_fn(context)`` builds the client-side network (its weights are replaced by the global
    ones at every round start); ``data_fn(context)`` returns the node's training data and an
    optional local test split. Both are called once per node and process, then cached.
    """

    def __init__(self, model_fn: ModelFn, data_fn: DataFn, *, device: str = "cpu") -> None:
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.device = device
        self._cores: dict[tuple[int, int], SplitClientCore] = {}

    def core(self, context: Context) -> SplitClientCore:
        """The node's cached core (model skeleton and data built once per process)."""
        key = (int(context.run_id), int(context.node_id))
        if key not in self._cores:
            train, test = self.data_fn(context)
            self._cores[key] = SplitClientCore(
                self.model_fn(context),
                train,
                test,
                client_id=client_id_of(context),
                device=self.device,
            )
        return self._cores[key]

    def register(self, app: ClientApp) -> ClientApp:
        """Add the ``train.split_*`` and ``evaluate.split`` handlers to ``app``."""
        app.train("split_begin")(self.on_begin)
        app.train("split_step")(self.on_step)
        app.train("split_end")(self.on_end)
        app.evaluate("split")(self.on_evaluate)
        return app

    # -- handlers -----------------------------------------------------------------------------
    def on_begin(self, msg: Message, context: Context) -> Message:
        """Round start: adopt the global weights and send the first batch's activations."""
        started = time.perf_counter()
        core = self.core(context)
        settings = StepSettings.from_config(msg.content.config_records[P.CONFIG])
        weights = P.record_to_state(msg.content.array_records[P.ARRAYS])
        state = core.start_round(weights, ClientState.from_records(context.state))
        batch = core.forward(state, settings, step=0)
        return self._smashed_reply(msg, context, state, batch, started)

    def on_step(self, msg: Message, context: Context) -> Message:
        """A step: apply the gradient of the pending batch, then send the next batch."""
        started = time.perf_counter()
        core, state, settings = self._resume(msg, context)
        step = P.config_int(msg.content.config_records[P.CONFIG], P.STEP)
        batch = core.forward(state, settings, step=step)
        return self._smashed_reply(msg, context, state, batch, started)

    def on_end(self, msg: Message, context: Context) -> Message:
        """Round end: apply the last gradient and return the weights for FedAvg."""
        started = time.perf_counter()
        core, state, settings = self._resume(msg, context)
        self._store(context, state)
        steps = P.config_int(msg.content.config_records[P.CONFIG], P.STEP)
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: steps * settings.batch_size,
                P.CLIENT_ID: core.client_id,
                P.CLIENT_SECONDS: time.perf_counter() - started,
            }
        )
        content = RecordDict({P.ARRAYS: P.state_to_record(state.weights), P.METRICS: metrics})
        return Message(content, reply_to=msg)

    def on_evaluate(self, msg: Message, context: Context) -> Message:
        """Federated evaluation: compressed activations of the local test split."""
        started = time.perf_counter()
        core = self.core(context)
        config = msg.content.config_records[P.CONFIG]
        settings = StepSettings.from_config(config)
        weights = P.record_to_state(msg.content.array_records[P.ARRAYS])
        max_examples = P.config_int(config, "max-examples") if "max-examples" in config else 0
        batches = core.evaluate(weights, settings, max_examples)
        arrays = ArrayRecord()
        for i, batch in enumerate(batches):
            arrays[f"activations.{i}"] = P.payload_array(batch.blob)
            arrays[f"labels.{i}"] = P.tensor_array(batch.labels)
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: sum(len(b.labels) for b in batches),
                P.CLIENT_ID: core.client_id,
                P.CLIENT_SECONDS: time.perf_counter() - started,
            }
        )
        return Message(RecordDict({P.SMASHED: arrays, P.METRICS: metrics}), reply_to=msg)

    # -- helpers ------------------------------------------------------------------------------
    def _resume(
        self, msg: Message, context: Context
    ) -> tuple[SplitClientCore, ClientState, StepSettings]:
        core = self.core(context)
        state = ClientState.from_records(context.state)
        if state is None:
            raise ValueError(
                f"node {context.node_id} got {msg.metadata.message_type} before "
                f"{P.SPLIT_BEGIN}; its state was lost (node restarted?)"
            )
        settings = StepSettings.from_config(msg.content.config_records[P.CONFIG])
        gradient = P.array_tensor(msg.content.array_records[P.GRADIENT]["gradient"])
        core.backward(state, settings, gradient)
        return core, state, settings

    def _store(self, context: Context, state: ClientState) -> None:
        for key, record in state.to_records().items():
            context.state[key] = record

    def _smashed_reply(
        self,
        msg: Message,
        context: Context,
        state: ClientState,
        batch: EncodedBatch,
        started: float,
    ) -> Message:
        self._store(context, state)
        core = self.core(context)
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: len(core.train_data),
                P.CLIENT_ID: core.client_id,
                P.CLIENT_SECONDS: time.perf_counter() - started,
                "raw-bytes": batch.raw_nbytes,
                "compression-error": batch.error,
            }
        )
        content = RecordDict(
            {P.SMASHED: P.smashed_record(batch.blob, batch.labels), P.METRICS: metrics}
        )
        return Message(content, reply_to=msg)


def make_client_app(model_fn: ModelFn, data_fn: DataFn, *, device: str = "cpu") -> ClientApp:
    """A ClientApp that speaks the split protocol, from a model factory and a data factory."""
    return SplitClient(model_fn, data_fn, device=device).register(ClientApp())
