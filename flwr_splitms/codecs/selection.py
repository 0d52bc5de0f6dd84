"""Top-k selection shared by the sparsifying codecs (``sp``, ``rt``, ``ms``), on any device.

``keep_count`` turns a sparsification ratio into k; ``top_indices`` returns the positions of
the k largest magnitudes in their original (ascending) order. The selected set is canonical,
so the wire bytes do not depend on the device or the torch kernel: every element above the
k-th largest value, then elements equal to it from the lowest position up.

On a long single row the search is first narrowed with a threshold taken from a strided
sample: one comparison pass plus a top-k over ~1.3k candidates, several times faster than
``torch.topk`` over millions of elements, and still exact (it falls back to ``torch.topk``
whenever the narrowed set cannot be proven to contain the top k).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["flat_nonzero", "keep_count", "top_indices"]

_SAMPLE = 1 << 16  # sample size for the threshold estimate
_NARROW_MIN = 1 << 18  # rows shorter than this go straight to torch.topk


def keep_count(ratio: float, d: int) -> int:
    """k = floor((1 - ratio) * d), at least 1 when d > 0.

    A 1e-12 relative tolerance makes decimal ratios behave as written (ratio 0.9 of 20 elements
    keeps 2, although (1 - 0.9) * 20 is 1.9999999999999996 in floating point). Keeping at least
    one element gives tiny tensors a defined Top_min and never costs more than the formula's
    few bytes.
    """
    if d <= 0:
        return 0
    v = (1.0 - ratio) * d
    return max(1, min(d, math.floor(v + 1e-12 * max(v, 1.0))))


def top_indices(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending per row) of the k largest entries of each row of ``mag``.

    ``mag`` is a 2-D (rows, m) tensor of non-negative magnitudes on any device, 0 <= k <= m.
    Exactly k indices per row, on ``mag``'s device; ties at the k-th value go to the lowest
    positions.
    """
    rows, m = mag.shape
    dev = mag.device
    if k == 0:
        return torch.empty(rows, 0, dtype=torch.int64, device=dev)
    if k == m:
        return torch.arange(m, device=dev).expand(rows, m).contiguous()
    if rows == 1 and m >= _NARROW_MIN and 8 * k <= m:
        narrowed = _narrowed_topk(mag[0], k)
        if narrowed is not None:
            return narrowed.unsqueeze(0)
    kth = _kth_largest(mag, k)
    keep = _at_least(mag, kth, k)
    return (flat_nonzero(keep.view(-1)) % m).view(rows, k)


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the True entries of a 1-D bool tensor, on its device.

    On the CPU numpy's ``flatnonzero`` is about 20x faster than ``torch.nonzero``; elsewhere
    it is ``torch.nonzero`` (one host sync for the count, as any compaction needs).
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().view(-1)


def _kth_largest(vals: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 1) k-th largest value of each row (a quickselect; topk where it is missing)."""
    m = vals.shape[1]
    if vals.device.type != "mps":
        return torch.kthvalue(vals, m - k + 1, dim=1, keepdim=True).values
    return torch.topk(vals, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


def _at_least(vals: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the canonical top k of each row, given each row's k-th largest value.

    Every value above ``kth``, then values equal to it in position order until k are taken.
    """
    keep = vals >= kth
    counts = keep.sum(dim=1, keepdim=True)
    if bool((counts == k).all()):  # no ties at the k-th value: the common case
        return keep
    above = vals > kth
    tied = keep & ~above
    need = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= need))


def _narrowed_topk(row: torch.Tensor, k: int) -> torch.Tensor | None:
    """Ascending canonical top-k positions of a long row via a sampled threshold, or None.

    With thr a value of the row and C = {i : row[i] >= thr}: if |C| >= k, every top-k element
    is >= the k-th largest value >= thr, so the top-k of C is a top-k of the row. None when C
    is too small (then nothing is proven) or too large (then narrowing does not pay off).
    """
    m = row.numel()
    sample = row[:: max(1, m // _SAMPLE)].contiguous()  # topk is 2-3x faster on contiguous
    ns = sample.numel()
    j = min(ns, math.ceil(ns * k / m * 1.25) + 64)
    thr = torch.topk(sample, j, sorted=False).values.min()  # the j-th largest sampled value
    if row.device.type == "cpu":  # numpy compares and compacts several times faster here
        cand = torch.from_numpy(np.flatnonzero(row.numpy() >= thr.item()))
    else:
        cand = (row >= thr).nonzero().view(-1)
    if cand.numel() < k or cand.numel() > m // 4:
        return None
    vals = row.index_select(0, cand).unsqueeze(0)
    kth = _kth_largest(vals, k)
    return cand.index_select(0, flat_nonzero(_at_least(vals, kth, k)[0]))
