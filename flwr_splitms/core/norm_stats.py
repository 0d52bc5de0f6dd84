"""BatchNorm statistics of the weights as they are now, for evaluation (``reestimate-bn``).

PyTorch's running averages (``momentum`` 0.1) trail the weights by about ten steps, so early in
training, and in any short run, evaluation normalises with the statistics of weights long gone
(Wu & Johnson, 2021, "Rethinking 'Batch' in BatchNorm", on PreciseBN). At each round's end both
halves re-estimate them on the round's last batches; training, which normalises with each
batch's own statistics, never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


NORM_EXAMPLES = 256
"""Examples (the latest steps' joint batches) the round-end BatchNorm statistics come from."""


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Set ``model``'s BatchNorm running statistics to the mean of those of ``batches`` (one
    forward pass each) under its weights now.

    Only the running statistics change. Each module's ``momentum`` and ``num_batches_tracked``
    are kept, and so is the global RNG (a model with dropout draws from a forked one).
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, BATCHNORMS) and isinstance(m.num_batches_tracked, torch.Tensor)
    ]  # the modules with running statistics (track_running_stats)
    if not norms or not batches:
        return
    kept = [(m.momentum, torch.as_tensor(m.num_batches_tracked).clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    device = batches[0].device
    was_training = model.training
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        model.train()  # dropout's draws above leave training's RNG alone
        for batch in batches:
            model(batch)
    model.train(was_training)
    for m, (momentum, tracked) in zip(norms, kept, strict=True):
        m.momentum = momentum
        torch.as_tensor(m.num_batches_tracked).copy_(tracked)
