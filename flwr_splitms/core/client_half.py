"""The client half of SplitFed: data order, forward + encode, backward from the server's gradient.

One participant holds the first part of the network. Per block of ``K`` steps it forwards ``K``
batches and encodes their activations; one message later it receives one gradient per batch and
applies them in order. Each batch's parameter gradient is taken at the weights the block was
forwarded with (for K = 1 that is the exact algorithm; for K > 1 the later batches of a block see
weights that are up to K - 1 updates old).

When the process that forwarded a block is the one that receives its gradients (the local engine,
a Ray actor that gets the node's next message, the in-process grid), the live autograd graph is
used. Otherwise (a fresh process per message) the forward of the same batches is recomputed with
the same data, augmentation and codec draws, on copies of the BatchNorm buffers so that every
batch updates the running statistics exactly once. Both paths give identical weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flwr_splitms.codecs import Payload
from flwr_splitms.core.batches import (
    BatchKey,
    DataCursor,
    augment_generator,
    batch_positions,
    codec_generator,
    replayed_rng,
    take_batch,
)
from flwr_splitms.core.budget import CodecChoice, Measurement, fit_to_budget, measure
from flwr_splitms.core.link import Link, link_for
from flwr_splitms.core.norm_stats import reestimate_batchnorm
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.data import BatchSource
from flwr_splitms.devices import resolve_device


@dataclass
class ClientState:
    """Everything a client carries from one message to the next.

    ``weights`` are the model's state after the last forward (BatchNorm buffers updated, parameters
    those the pending block was forwarded with); ``updates`` counts the SGD steps applied so far.
    """

    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    position: int = 0
    updates: int = 0
    pending: list[BatchKey] = field(default_factory=list)

    def token(self) -> tuple[object, ...]:
        """Identifies this point of the node's (deterministic) trajectory."""
        return (tuple(self.pending), self.updates, self.epoch, self.position)


@dataclass
class EncodedBatch:
    """One batch's uplink: payload bytes, labels, and what it cost (error NaN if not measured)."""

    blob: bytes
    labels: torch.Tensor
    raw_nbytes: int
    error: float


@dataclass
class _LiveBlock:
    """The autograd graphs of a forwarded block, kept for the backward in the same process."""

    token: tuple[object, ...]
    activations: list[torch.Tensor]
    supports: list[torch.Tensor | None]


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
    recomputed batch and the local engine see the same data order and augmentation. ``device``
    is ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``keep_graph`` keeps the
    autograd graph of the pending block for a backward in the same process.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: BatchSource,
        test_data: BatchSource | None = None,
        *,
        client_id: int = 0,
        device: str | torch.device = "cpu",
        keep_graph: bool = True,
    ) -> None:
        self.device = resolve_device(str(device))
        self.model = model.to(self.device)
        self.train_data = train_data
        self.test_data = test_data
        self.client_id = client_id
        self.keep_graph = keep_graph
        self._live: _LiveBlock | None = None
        self._holds: ClientState | None = None  # the state object the model currently holds

    # -- state --------------------------------------------------------------------------------
    def start_round(
        self, global_weights: Mapping[str, torch.Tensor], cursor: DataCursor | None
    ) -> ClientState:
        """The state at a round's start: the global weights and this client's data cursor.

        ``cursor`` is where the previous round left the client's data order; None on its first
        round. Momentum starts from zero every round, as a fresh local optimizer in FedAvg does,
        so a round depends only on the global weights and the cursor.
        """
        state = ClientState(
            weights={k: v.detach().cpu().clone() for k, v in global_weights.items()}
        )
        if cursor is not None:
            state.epoch, state.position, state.updates = cursor
        self._live = None
        self._holds = None
        return state

    @staticmethod
    def cursor(state: ClientState) -> DataCursor:
        """Where the client's data order stands."""
        return DataCursor(state.epoch, state.position, state.updates)

    def _ensure_loaded(self, state: ClientState) -> None:
        if self._holds is not state:
            self.model.load_state_dict(state.weights)
            self._holds = state

    def _save(self, state: ClientState) -> None:
        state.weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self._holds = state

    # -- data order ---------------------------------------------------------------------------
    def _advance(self, state: ClientState, batch_size: int) -> tuple[int, int]:
        """Take the next full batch of the epoch, returning its (epoch, position)."""
        epoch, position = take_batch(
            len(self.train_data), batch_size, state.epoch, state.position, self.client_id
        )
        state.epoch, state.position = epoch, position + batch_size
        return epoch, position

    def _inputs(self, settings: StepSettings, key: BatchKey) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, server_round, step = key
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
        return x.to(self.device, non_blocking=True), y

    def _model_rng(
        self, settings: StepSettings, key: BatchKey
    ) -> contextlib.AbstractContextManager[None]:
        """Dropout draws of a batch's forward pass, the same when it is recomputed."""
        return replayed_rng(
            self.device, settings.seed, "forward", self.client_id, key.server_round, key.step
        )

    def _codec_rng(self, settings: StepSettings, key: BatchKey) -> torch.Generator:
        return codec_generator(settings.seed, self.client_id, key.server_round, key.step)

    # -- the protocol's two halves ------------------------------------------------------------
    def forward(
        self, state: ClientState, settings: StepSettings, steps: Sequence[int]
    ) -> list[EncodedBatch]:
        """Forward the next batches (one per step), updating BatchNorm statistics, and encode."""
        if state.pending:
            raise ValueError(
                f"client {self.client_id} was asked for new batches while {len(state.pending)} "
                "still await their gradient; the strategy's messages arrived out of order"
            )
        link = link_for(settings)
        self._ensure_loaded(state)
        self.model.train()
        graphs: list[torch.Tensor] = []
        supports: list[torch.Tensor | None] = []
        batches = []
        for step in steps:
            epoch, position = self._advance(state, settings.batch_size)
            key = BatchKey(epoch, position, settings.server_round, step)
            x, y = self._inputs(settings, key)
            with torch.set_grad_enabled(self.keep_graph), self._model_rng(settings, key):
                activations = self.model(x)
            payload, error = self._encode(
                link, activations.detach(), settings, key, measured=settings.measures_error(step)
            )
            graphs.append(activations)
            supports.append(link.support(payload))
            state.pending.append(key)
            batches.append(EncodedBatch(payload.to_bytes(), y, payload.raw_nbytes, error))
        self._save(state)
        self._live = _LiveBlock(state.token(), graphs, supports) if self.keep_graph else None
        return batches

    def _encode(
        self,
        link: Link,
        activations: torch.Tensor,
        settings: StepSettings,
        key: BatchKey,
        *,
        measured: bool,
    ) -> tuple[Payload, float]:
        """The upload of a batch's activations (and its relative error when ``measured``)."""
        rng = self._codec_rng(settings, key)
        if measured:
            payload, error = link.uplink.encode_measured(activations, generator=rng, train=True)
        else:
            payload, error = link.uplink.encode(activations, generator=rng, train=True), math.nan
        if settings.budget_bits:  # codec = "budget": never over it (a zstd setting may be)
            fallback = CodecChoice.parse(settings.budget_fallback)
            payload, error = fit_to_budget(
                payload,
                error,
                activations,
                settings.budget_bits,
                fallback,
                generator=self._codec_rng(settings, key),
                measure_error=measured,
            )
        return payload, error

    def probe(
        self,
        weights: Mapping[str, torch.Tensor],
        cursor: DataCursor | None,
        settings: StepSettings,
        *,
        budget_bits: float,
        sample: int,
    ) -> dict[str, Measurement]:
        """codec = "budget": the error and size of each codec setting within ``budget_bits`` on
        the activations of the round's first batch; nothing is trained, sent or kept."""
        state = self.start_round(weights, cursor)
        self._ensure_loaded(state)
        self.model.train()
        epoch, position = take_batch(
            len(self.train_data), settings.batch_size, state.epoch, state.position, self.client_id
        )
        key = BatchKey(epoch, position, settings.server_round, 0)
        x, _ = self._inputs(settings, key)
        with torch.no_grad(), _scratch_buffers(self.model), self._model_rng(settings, key):
            activations = self.model(x)
        return measure(activations, budget_bits, sample=sample)

    def backward(
        self,
        state: ClientState,
        settings: StepSettings,
        gradients: Sequence[bytes],
        *,
        round_end: bool = False,
    ) -> None:
        """Apply the server's gradients (downlink bytes, one per pending batch) in order.

        At the ``round_end`` with ``settings.reestimate_bn``, the BatchNorm statistics then
        become those of the block's batches under the final weights (the server does the same
        for its half), so that evaluation normalises as training did.
        """
        if not state.pending:
            raise ValueError(
                f"client {self.client_id} got a gradient but has no pending batch; the "
                "strategy's messages arrived out of order"
            )
        if len(gradients) != len(state.pending):
            raise ValueError(
                f"client {self.client_id} got {len(gradients)} gradients for "
                f"{len(state.pending)} pending batches"
            )
        link = link_for(settings)
        live = self._live if self._live is not None and self._live.token == state.token() else None
        self._live = None
        if live is None:
            self.model.load_state_dict(state.weights)
            self._holds = state
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        updates = []
        for j, key in enumerate(state.pending):
            if live is not None:
                activations, support = live.activations[j], live.supports[j]
            else:
                activations, support = self._recompute(link, settings, key)
            gradient = link.downlink.decode(gradients[j], support=support, device=self.device)
            if gradient.shape != activations.shape:
                raise ValueError(
                    f"gradient of shape {tuple(gradient.shape)} does not match the activations "
                    f"{tuple(activations.shape)} of client {self.client_id}"
                )
            if not gradient.is_floating_point():
                raise ValueError(f"gradient of dtype {gradient.dtype} is not a float tensor")
            updates.append(
                torch.autograd.grad(
                    activations, params, gradient.to(activations.dtype), allow_unused=True
                )
            )
        lrs = [settings.lr_at(key.step) for key in state.pending]
        self._sgd(state, settings, params, updates, lrs)
        if round_end and settings.reestimate_bn:
            inputs = [self._inputs(settings, key)[0] for key in state.pending]
            with self._model_rng(settings, state.pending[-1]):
                reestimate_batchnorm(self.model, inputs)
        state.updates += len(state.pending)
        state.pending = []
        self._save(state)

    def _recompute(
        self, link: Link, settings: StepSettings, key: BatchKey
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward of a pending batch again, with its graph (its buffers already updated)."""
        x, _ = self._inputs(settings, key)
        with _scratch_buffers(self.model), self._model_rng(settings, key):
            activations = self.model(x)
        support = None
        if link.downlink.needs_support:  # the payload as it was sent, budget guard included
            payload, _ = self._encode(link, activations.detach(), settings, key, measured=False)
            support = link.support(payload)
        return activations, support

    def _sgd(
        self,
        state: ClientState,
        settings: StepSettings,
        params: Sequence[torch.Tensor],
        updates: Sequence[Sequence[torch.Tensor | None]],
        lrs: Sequence[float],
    ) -> None:
        """SGD with momentum and weight decay, one step per batch at its own learning rate."""
        optimizer = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        named = {id(p): name for name, p in self.model.named_parameters()}
        for p in params:
            buf = state.momentum.get(named[id(p)])
            if buf is not None:
                optimizer.state[p]["momentum_buffer"] = buf.to(self.device).clone()
        for grads, lr in zip(updates, lrs, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
        for p in params:
            p.grad = None
        state.momentum = {
            named[id(p)]: optimizer.state[p]["momentum_buffer"].detach().cpu().clone()
            for p in params
            if optimizer.state[p].get("momentum_buffer") is not None
        }

    def evaluate(
        self, weights: Mapping[str, torch.Tensor], settings: StepSettings, max_examples: int = 0
    ) -> list[EncodedBatch]:
        """Compressed activations of the local test split, in inference mode."""
        if self.test_data is None or len(self.test_data) == 0:
            return []
        self.model.load_state_dict(dict(weights))
        self._holds = None
        self._live = None
        self.model.eval()
        codec = link_for(settings).uplink
        total = len(self.test_data) if max_examples <= 0 else min(max_examples, len(self.test_data))
        batches = []
        with torch.no_grad():
            for start in range(0, total, settings.batch_size):
                positions = torch.arange(start, min(start + settings.batch_size, total))
                x, y = self.test_data.batch(positions, augment=False)
                payload = codec.encode(self.model(x.to(self.device)), train=False)
                batches.append(EncodedBatch(payload.to_bytes(), y, payload.raw_nbytes, math.nan))
        return batches
