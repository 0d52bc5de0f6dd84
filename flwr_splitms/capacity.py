"""Will a run fit in memory? An estimate from the model, the batch, the data and the node counts.

A SplitFed round holds, at once, the activations of every sampled client: the server runs one
step on all of them concatenated (paper Eq. 1), and each client half keeps its block's autograd
graph until the gradient comes back. Memory therefore grows with the *sampled* clients times the
batch, and a run that samples too many is killed by the kernel rather than stopped with a
reason. :func:`estimate_memory` adds up what a run allocates beyond the processes' fixed base
(Python, torch, Flower, Ray), from measured per-sample bytes of each half
(:func:`measure_footprint`: one forward on two samples, counting what autograd saves), and
:func:`check_memory` refuses a run that would not fit with one line: the estimate, the memory
available, and the fix.

What the estimate counts (``B`` batch, ``K`` steps-per-message, ``S`` sampled, ``N`` registered):

============================  =================================================================
part                          bytes
============================  =================================================================
server step                   ``S x B x (1.5 x server saved + 4 x cut)`` (its graph and the
                              backward pass's buffers; the decoded, concatenated activations,
                              their gradient and its encoding) ``+ (K - 1) x S x B x cut``
server model                  ``3 x server params`` (weights, gradients, momentum)
evaluation                    ``3 x eval-batch x largest activation`` (inference holds an
                              input, an output and a temporary at a time)
client halves (sampled)       ``S x (K x B x (client saved + 2 x cut) + 4 x client params)``
                              (live graphs, gradient messages, weights, momentum, state copies)
idle clients                  ``min(N x per client, processes x cache bound)`` (the client
                              processes' caches of client halves and partitions)
Flower's registered nodes     ``N x 10 kB`` (measured: a node's context and link-state record)
============================  =================================================================

Calibration (ResNet18 shallow, batch 8, CPU, Flower 1.42 simulation, 10 against 40 sampled
clients): the ServerApp process grew 47 MB per sampled client (5.9 MB per sample; autograd saves
3.3 MB of it, the factors above give 5.9 MB), the Ray actor 19 MB (the estimate: 17 MB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "CLIENT_CACHE_BYTES",
    "FLOWER_NODE_BYTES",
    "SERVER_PARTS",
    "Footprint",
    "InsufficientMemoryError",
    "MemoryEstimate",
    "RunShape",
    "available_memory",
    "check_memory",
    "estimate_memory",
    "gib",
    "measure_footprint",
]

CLIENT_CACHE_BYTES = 512 * 2**20
"""Default bound of one client process's cache of client halves and partitions (bytes)."""

FLOWER_NODE_BYTES = 10_000
"""Memory of one registered node in Flower 1.42's simulation process (measured: 9.4 kB)."""

SERVER_PARTS = ("server step", "server model", "evaluation")
"""The parts on the server model's device; the others are the clients' (host memory)."""

HEADROOM = 0.9
"""Share of the available memory a run may plan to use (the rest: allocator slack, the OS)."""


def gib(nbytes: float) -> str:
    """``nbytes`` as GiB with one decimal (``"3.2 GB"``), MiB below 1 GiB, kiB below 1 MiB."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.0f} MB"
    return f"{nbytes / 2**10:.0f} kB"


@dataclass(frozen=True)
class Footprint:
    """What one half of the split network needs, in bytes.

    ``params``: parameters and buffers. ``saved_per_sample``: tensors autograd keeps for the
    backward pass per training sample (parameters excluded); ``largest_per_sample``: the largest
    of them (inference holds a few such at a time). ``out_per_sample``: the half's output per
    sample (the cut-layer activations for the client half).
    """

    params: int
    saved_per_sample: int
    largest_per_sample: int
    out_per_sample: int


def measure_footprint(net: nn.Module, sample: torch.Tensor) -> tuple[Footprint, torch.Tensor]:
    """Measure ``net`` on ``sample`` (a batch of at least two inputs); also return its output.

    One training-mode forward with gradients, on copies of the buffers (the net's BatchNorm
    statistics are not touched), counting each distinct storage autograd saves. The output
    (detached) is the next half's sample.
    """
    if sample.shape[0] < 2:
        raise ValueError("measure_footprint needs a batch of at least 2 samples (BatchNorm)")
    params = {name: p for name, p in net.named_parameters()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    skip = {p.untyped_storage().data_ptr() for p in params.values()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = sample.detach().clone().requires_grad_(sample.is_floating_point())
    training = net.training
    net.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = functional_call(net, {**params, **buffers}, (x,))
    finally:
        net.train(training)
    count = sample.shape[0]
    param_bytes = sum(t.numel() * t.element_size() for t in (*params.values(), *buffers.values()))
    footprint = Footprint(
        params=param_bytes,
        saved_per_sample=math.ceil(sum(saved.values()) / count),
        largest_per_sample=math.ceil(max(saved.values(), default=0) / count),
        out_per_sample=math.ceil(out.numel() * out.element_size() / count),
    )
    return footprint, out.detach()


@dataclass(frozen=True)
class RunShape:
    """The counts that scale a run's memory.

    ``registered``: nodes connected (N); ``sampled``: nodes trained per round (S);
    ``client_processes``: processes that run ClientApps (Ray actors in simulation);
    ``cache_bytes``: each client process's cache bound; ``partition_bytes``: one client's data
    in memory.
    """

    registered: int
    sampled: int
    batch_size: int
    steps_per_message: int = 1
    eval_batch_size: int = 256
    client_processes: int = 1
    cache_bytes: int = CLIENT_CACHE_BYTES
    partition_bytes: int = 0


@dataclass
class MemoryEstimate:
    """Bytes a run allocates beyond its processes' fixed base, by part (see the module table)."""

    parts: dict[str, int] = field(default_factory=dict)
    fixes: dict[str, str] = field(default_factory=dict)  # part -> what lowers it

    @property
    def total(self) -> int:
        """All parts together."""
        return sum(self.parts.values())

    def largest(self) -> str:
        """The name of the largest part."""
        return max(self.parts, key=lambda name: self.parts[name])

    def subset(self, names: tuple[str, ...], *, keep: bool = True) -> MemoryEstimate:
        """The estimate of the parts in ``names`` (``keep=False``: of the other parts)."""
        chosen = [name for name in self.parts if (name in names) == keep]
        return MemoryEstimate(
            {name: self.parts[name] for name in chosen},
            {name: self.fixes[name] for name in chosen if name in self.fixes},
        )

    def summary(self) -> str:
        """The parts, largest first: ``"server step 30.1 GB, client halves 1.2 GB, ..."``."""
        order = sorted(self.parts, key=lambda name: -self.parts[name])
        return ", ".join(f"{name} {gib(self.parts[name])}" for name in order if self.parts[name])


def estimate_memory(client: Footprint, server: Footprint, shape: RunShape) -> MemoryEstimate:
    """What a run of ``shape`` allocates, from the two halves' footprints (module table)."""
    n, s, b, k = shape.registered, shape.sampled, shape.batch_size, shape.steps_per_message
    cut = client.out_per_sample
    idle_each = 4 * client.params + shape.partition_bytes
    estimate = MemoryEstimate()
    server_step = s * b * (3 * server.saved_per_sample // 2 + 4 * cut)
    estimate.parts["server step"] = server_step + (k - 1) * s * b * cut
    estimate.fixes["server step"] = (
        f"sample fewer clients per round ({s} sampled x batch {b}: lower fraction-train or "
        "min-nodes) or lower batch-size"
    )
    estimate.parts["server model"] = 3 * server.params
    estimate.fixes["server model"] = "use a smaller model or cut later"
    largest = max(client.largest_per_sample, server.largest_per_sample, cut)
    estimate.parts["evaluation"] = 3 * shape.eval_batch_size * largest
    estimate.fixes["evaluation"] = "lower eval-batch-size"
    live = k * b * (client.saved_per_sample + 2 * cut)
    estimate.parts["client halves"] = s * (live + 4 * client.params)
    estimate.fixes["client halves"] = (
        f"sample fewer clients per round ({s} sampled), lower batch-size or steps-per-message"
    )
    estimate.parts["idle clients"] = min(n * idle_each, shape.client_processes * shape.cache_bytes)
    estimate.fixes["idle clients"] = (
        "lower the client cache (FLWR_SPLITMS_CLIENT_CACHE_MB) or run fewer client processes"
    )
    estimate.parts["Flower's nodes"] = n * FLOWER_NODE_BYTES
    estimate.fixes["Flower's nodes"] = "register fewer SuperNodes"
    return estimate


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device`` (host: ``MemAvailable``); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None  # mps and others: no reliable figure
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


class InsufficientMemoryError(RuntimeError):
    """The run would need more memory than the machine has free (the message says the fix)."""


def check_memory(
    estimate: MemoryEstimate,
    available: int | None,
    *,
    where: str = "this machine",
    extra_fix: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`InsufficientMemoryError` (one line) when ``estimate`` exceeds ``available``.

    The run may plan to use :data:`HEADROOM` of what is available. ``available`` None (unknown)
    passes. ``extra_fix`` overrides the fix named for a part.
    """
    if available is None or estimate.total <= HEADROOM * available:
        return
    largest = estimate.largest()
    fix = dict(estimate.fixes, **dict(extra_fix or {})).get(largest, "")
    raise InsufficientMemoryError(
        f"not enough memory: this run needs about {gib(estimate.total)} "
        f"({estimate.summary()}) but {where} has {gib(available)} available. "
        f"Fix: {fix}"
    )
