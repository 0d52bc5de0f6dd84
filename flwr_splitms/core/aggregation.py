"""FedAvg of client-side weights, computed exactly as Flower's ``FedAvg`` does it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def fedavg(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts, in Flower's order of operations, cast back to each dtype.

    Flower accumulates ``array * (weight / total)`` in numpy; integer buffers (BatchNorm's
    ``num_batches_tracked``) are rounded back to their integer dtype.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state dict and at least one state dict")
    total = sum(weights)
    factors = [w / total for w in weights]
    out: dict[str, torch.Tensor] = {}
    for key, reference in states[0].items():
        acc = states[0][key].cpu().numpy() * factors[0]
        for state, factor in zip(states[1:], factors[1:], strict=True):
            acc += state[key].cpu().numpy() * factor
        dtype = reference.cpu().numpy().dtype
        if np.issubdtype(dtype, np.integer):
            acc = np.rint(acc)
        out[key] = torch.from_numpy(np.array(acc.astype(dtype), order="C"))
    return out
