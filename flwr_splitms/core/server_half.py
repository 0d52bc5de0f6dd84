"""The server half of SplitFed: check and decode the uplink, the server step, evaluation.

``server_step`` is the math of one step (paper Eq. 1 and Lemma 2); :class:`SplitServerCore` holds
the server model and its optimizer and runs a block of steps on what the clients sent, dropping a
client whose upload is unusable before the model is stepped on it.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from flwr_splitms.codecs import Codec, Payload, PayloadError
from flwr_splitms.core.batches import grad_codec_generator, replayed_rng
from flwr_splitms.core.client_half import EncodedBatch
from flwr_splitms.core.link import Link
from flwr_splitms.core.norm_stats import NORM_EXAMPLES, reestimate_batchnorm
from flwr_splitms.core.settings import StepSettings
from flwr_splitms.data import BatchSource
from flwr_splitms.devices import resolve_device

NodeT = TypeVar("NodeT")
LR_SCALE = "lr_scale"  # an optimizer group's share of the step's rate (the output layer's)


class UplinkError(ValueError):
    """A client's upload cannot be used (it is dropped from the round; the run goes on)."""


@dataclass
class StepOutcome:
    """What one server step produced (gradients on the server's device)."""

    gradients: list[torch.Tensor]
    loss: float
    client_losses: list[float]


def server_step(
    server_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
) -> StepOutcome:
    """One SplitFed server step on the clients' decoded activations (paper Eq. 1).

    The server loss is the mean over clients of each client's mean loss. Each client gets the
    gradient of its own mean loss w.r.t. its decoded activations (identity through the codec,
    paper Lemma 2), so its update has the scale of ordinary SGD on its own batch. The server runs
    one forward pass over all clients' activations, so BatchNorm sees the joint batch.
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
        (_grad(x) * count).to(dtype=a.dtype) for x, a in zip(inputs, activations, strict=True)
    ]
    losses = torch.stack([c.detach() for c in client_losses]).cpu().tolist()
    return StepOutcome(gradients, float(loss.detach()), losses)


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
        decoded = codec.decode(codec.encode(activations, train=False), device=server_device)
        batch = score(server_net(decoded.float()), y.to(server_device))
        loss, top1, top5 = loss + batch[0], top1 + batch[1], top5 + batch[2]
    return summarize(loss, top1, top5, total)


@dataclass
class ClientUpload:
    """What one client sent for a block: one (payload bytes, labels) per step, and its costs."""

    client_id: int
    blobs: list[bytes]
    labels: list[torch.Tensor]
    raw_nbytes: float = 0.0
    errors: list[float] = field(default_factory=list)

    @classmethod
    def of_batches(cls, client_id: int, batches: Sequence[EncodedBatch]) -> ClientUpload:
        """The upload of a block that a client half encoded (no message in between)."""
        return cls(
            client_id,
            [b.blob for b in batches],
            [b.labels for b in batches],
            float(sum(b.raw_nbytes for b in batches)),
            [b.error for b in batches],
        )


@dataclass
class _Decoded:
    activations: list[torch.Tensor]
    labels: list[torch.Tensor]
    supports: list[torch.Tensor | None]


@dataclass
class BlockResult(Generic[NodeT]):
    """The server's answer to a block: downlink bytes per client, losses, dropped clients."""

    gradients: dict[NodeT, list[bytes]]
    losses: list[float]
    dropped: dict[NodeT, str]


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The model's output layer: its last ``nn.Linear`` (None when it has none)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear[-1] if linear else None


def _num_classes(model: nn.Module) -> int | None:
    head = output_layer(model)
    return head.out_features if head is not None else None


class SplitServerCore:
    """The server-side model and optimizer, and one block of SplitFed steps on clients' uploads.

    ``num_classes`` bounds the labels a client may send (default: the last ``nn.Linear``'s
    outputs; no check when the model has none). ``head_lr_scale``: the output layer (that
    ``nn.Linear``) trains at this share of the rate; see :mod:`flwr_splitms.core.schedule`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        device: str | torch.device = "cpu",
        num_classes: int | None = None,
        head_lr_scale: float = 1.0,
        reestimate_bn: bool = False,
    ) -> None:
        if head_lr_scale < 0:
            raise ValueError(f"head_lr_scale must be >= 0, got {head_lr_scale}")
        self.device = resolve_device(str(device))
        self.model = model.to(self.device)
        head = output_layer(self.model)
        in_head = {id(p) for p in head.parameters()} if head is not None else set()
        params = list(self.model.parameters())
        groups = [
            {"params": [p for p in params if id(p) not in in_head], LR_SCALE: 1.0},
            {"params": [p for p in params if id(p) in in_head], LR_SCALE: head_lr_scale},
        ]
        self.optimizer = torch.optim.SGD(
            [g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        self.set_lr(lr)
        self.num_classes = num_classes if num_classes is not None else _num_classes(model)
        self.sample_shape: tuple[int, ...] | None = None  # activation shape per example
        self.reestimate_bn = reestimate_bn
        self.recent: deque[list[torch.Tensor]] = deque()  # the latest steps' decoded inputs

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        """Adopt a checkpoint's optimizer state (momentum) under this run's rate shares.

        A checkpoint written before the output layer had a group of its own (one group, the
        parameters in model order) is regrouped.
        """
        saved_groups = list(state["param_groups"])
        if len(saved_groups) == 1 and len(self.optimizer.param_groups) > 1:
            position = {id(p): i for i, p in enumerate(self.model.parameters())}
            ours = [position[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
            saved, groups, start = dict(state["state"]), [], 0
            for group in self.optimizer.param_groups:
                indices = list(range(start, start + len(group["params"])))
                groups.append({**saved_groups[0], LR_SCALE: group[LR_SCALE], "params": indices})
                start += len(indices)
            state = {
                "state": {i: saved[old] for i, old in enumerate(ours) if old in saved},
                "param_groups": groups,
            }
        scales = [group.get(LR_SCALE, 1.0) for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(dict(state))
        for group, scale in zip(self.optimizer.param_groups, scales, strict=True):
            group[LR_SCALE] = scale  # the run's setting, not the checkpoint's

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps (the output layer's: ``head_lr_scale`` x it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get(LR_SCALE, 1.0)

    # -- checking what clients sent -----------------------------------------------------------
    def decode_upload(
        self, link: Link, blob: bytes, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoded activations (on the server's device), labels and downlink support of a batch.

        Raises :class:`UplinkError` naming the reason for anything the server must not train on.
        """
        try:
            payload = Payload.from_bytes(blob)
            activations = link.uplink_of(payload).decode(payload, device=self.device)
        except PayloadError as err:
            raise UplinkError(f"payload does not decode: {err}") from None
        if labels.dim() != 1 or activations.dim() < 1 or activations.shape[0] != labels.shape[0]:
            raise UplinkError(
                f"activations of shape {tuple(activations.shape)} do not match "
                f"{tuple(labels.shape)} labels"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise UplinkError(f"labels of dtype {labels.dtype} are not class indices")
        if labels.numel() and (
            int(labels.min()) < 0
            or (self.num_classes is not None and int(labels.max()) >= self.num_classes)
        ):
            raise UplinkError(
                f"labels outside the classes 0..{(self.num_classes or 0) - 1}: "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        if not bool(torch.isfinite(activations).all()):
            raise UplinkError("activations hold NaN or Inf")
        return activations, labels.long(), link.support(payload)

    def _decode_block(
        self, link: Link, uploads: Mapping[NodeT, ClientUpload], batches: int
    ) -> tuple[dict[NodeT, _Decoded], dict[NodeT, str]]:
        """Decode every client's block; drop those that are unusable or disagree on the shape."""
        decoded: dict[NodeT, _Decoded] = {}
        dropped: dict[NodeT, str] = {}
        for node, upload in uploads.items():
            try:
                if len(upload.blobs) != batches or len(upload.labels) != batches:
                    raise UplinkError(
                        f"sent {len(upload.blobs)} payloads and {len(upload.labels)} label "
                        f"sets, {batches} of each expected"
                    )
                parts = [
                    self.decode_upload(link, blob, y)
                    for blob, y in zip(upload.blobs, upload.labels, strict=True)
                ]
            except UplinkError as err:
                dropped[node] = str(err)
                continue
            decoded[node] = _Decoded(
                [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
            )
        shapes = Counter(tuple(a.shape[1:]) for d in decoded.values() for a in d.activations)
        if not shapes:
            return decoded, dropped
        agreed = self.sample_shape or shapes.most_common(1)[0][0]
        for node in list(decoded):
            odd = [tuple(a.shape[1:]) for a in decoded[node].activations]
            odd = [shape for shape in odd if shape != agreed]
            if odd:
                dropped[node] = f"activations of shape {odd[0]} per example, expected {agreed}"
                del decoded[node]
        if decoded:
            self.sample_shape = agreed
        return decoded, dropped

    # -- a block of steps ---------------------------------------------------------------------
    def run_block(
        self,
        link: Link,
        settings: StepSettings,
        uploads: Mapping[NodeT, ClientUpload],
        first_step: int,
        batches: int,
        choose_downlink: Callable[[list[torch.Tensor]], Link] | None = None,
        *,
        round_end: bool = False,
    ) -> BlockResult[NodeT]:
        """The ``batches`` server steps of one block, in order, on the usable uploads.

        Clients are concatenated in client-id order. Returns each client's downlink bytes.
        ``choose_downlink`` (a byte budget for the gradients) gets the first step's raw
        gradients and returns the link whose downlink codec encodes the block's gradients.
        ``round_end`` (a round's last block), when the core re-estimates BatchNorm
        (``reestimate_bn``): afterwards the statistics become those of the round's latest
        steps' joint batches (at least :data:`NORM_EXAMPLES` examples, or the round) under the
        final weights (:func:`reestimate_batchnorm`).
        """
        if first_step == 0:
            self.recent.clear()
        decoded, dropped = self._decode_block(link, uploads, batches)
        order = sorted(decoded, key=lambda node: uploads[node].client_id)
        gradients: dict[NodeT, list[bytes]] = {node: [] for node in order}
        losses: list[float] = []
        if not order:
            return BlockResult(gradients, losses, dropped)
        for j in range(batches):
            step = first_step + j
            self.set_lr(settings.lr_at(step))
            with replayed_rng(self.device, settings.seed, "server", settings.server_round, step):
                outcome = server_step(
                    self.model,
                    self.optimizer,
                    [decoded[n].activations[j] for n in order],
                    [decoded[n].labels[j] for n in order],
                )
            losses.append(outcome.loss)
            if self.reestimate_bn:
                self._keep([decoded[n].activations[j] for n in order])
            if choose_downlink is not None and j == 0:
                link = choose_downlink(outcome.gradients)
            for node, gradient in zip(order, outcome.gradients, strict=True):
                rng = grad_codec_generator(
                    settings.seed, uploads[node].client_id, settings.server_round, step
                )
                gradients[node].append(
                    link.downlink.encode(gradient, support=decoded[node].supports[j], generator=rng)
                )
        if round_end and self.reestimate_bn:
            reestimate_batchnorm(self.model, [torch.cat(step).float() for step in self.recent])
            self.recent.clear()
        return BlockResult(gradients, losses, dropped)

    def _keep(self, step: list[torch.Tensor]) -> None:
        """Keep a step's inputs for the round-end statistics: the latest NORM_EXAMPLES' worth.

        Of each client's batch, the first NORM_EXAMPLES / clients rows (at least one), copied,
        so that a step of many clients keeps little and frees its decoded activations.
        """
        rows = math.ceil(NORM_EXAMPLES / len(step))  # a step has at least one client
        self.recent.append([a[:rows].clone() for a in step])
        kept = sum(len(a) for inputs in self.recent for a in inputs)
        while len(self.recent) > 1 and kept - sum(map(len, self.recent[0])) >= NORM_EXAMPLES:
            kept -= sum(map(len, self.recent.popleft()))

    @torch.no_grad()
    def score_uploads(self, link: Link, uploads: Sequence[ClientUpload]) -> dict[str, float]:
        """Federated evaluation: score the clients' encoded test activations with this model."""
        self.model.eval()
        loss, top1, top5, count = 0.0, 0, 0, 0
        for upload in uploads:
            for blob, y in zip(upload.blobs, upload.labels, strict=True):
                x, labels, _ = self.decode_upload(link, blob, y)
                batch = score(self.model(x.float()), labels.to(self.device))
                loss, top1, top5 = loss + batch[0], top1 + batch[1], top5 + batch[2]
                count += len(labels)
        return summarize(loss, top1, top5, count)
