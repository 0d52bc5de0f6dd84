"""``rt``: randomized Top-k sparsification of Zheng et al. (IJCAI 2023, arXiv 2305.18469).

Sampling rule (the paper's randomized top-k, as implemented by its authors in
``split_learn/modifiers.py::NaiveRandomTopKModifier`` of github.com/zfscgy/SplitLearning, and
identically by the MS authors' ``RandTopkSparsification`` baseline in
github.com/BinaryMus/MaskSparsification ``compression.py``): let T be the top-k set by
magnitude. Draw k distinct positions by successive sampling without replacement
(``torch.multinomial(p, k, replacement=False)``) from the weights

    p_i = (1 - alpha) / k        for i in T,
    p_i = alpha / (d - k)        otherwise,

so the top-k elements are kept with high probability and other positions sometimes are, so
that their neurons still receive gradient. (The first draw leaves the top-k set with
probability alpha; as the top-k weight is used up, later draws do so more often, so on average
somewhat more than alpha * k kept positions lie outside it.) Their default alpha is 0.1
(their experiments use 0.05 to 0.3). At inference (``train=False``) plain Top-k is used, so
``rt`` with ``train=False`` produces exactly the ``sp`` selection. Like the MS authors'
baseline, we sample over the whole tensor (Zheng et al. sample per example).

The kept positions and values use the ``sp`` wire format; the decoder is ``sp``'s.

Devices: the top-k runs on the tensor's device; the O(k) sampling below runs on the CPU with
the CPU ``generator``, so a seed gives the same positions (and bytes) on every device.

Implementation: successive sampling with weights w_i equals taking the k smallest keys
E_i / w_i with E_i ~ Exp(1). The weights take two values, so only the k smallest keys of each
group matter, and they are exponential order statistics, generated directly by Renyi's
representation (cumulative sums of Exp(1) / (w * (n - j)) ). That fixes how many positions
come from outside T; within each group the chosen subset is uniform. Cost: O(k log k) random
work after the top-k, no pass of random numbers over all d elements, no Python loop over
elements, and reproducible from a seeded ``torch.Generator``.
"""

from __future__ import annotations

import torch

from .params import FloatRange
from .registry import register
from .topk import RATIO, TopKCodec

__all__ = ["RandTopKCodec", "sample_positions"]

ALPHA = FloatRange("alpha", 0.1, 0.0, 1.0, low_closed=True)


@register
class RandTopKCodec(TopKCodec):
    """Randomized Top-k; params: ``ratio`` in (0, 1) and ``alpha`` in [0, 1) (default 0.1)."""

    name = "rt"
    codec_id = 3
    param_specs = (RATIO, ALPHA)

    def _select(
        self, mag: torch.Tensor, k: int, generator: torch.Generator | None, train: bool
    ) -> torch.Tensor:
        top = super()._select(mag, k, generator, train)
        if not train:
            return top
        alpha = float(self._params["alpha"])  # type: ignore[arg-type]
        # O(k) sampling on the CPU, where the (CPU) generator lives: the same positions for
        # the same seed whatever the tensor's device.
        return sample_positions(top.cpu(), mag.numel(), alpha, generator).to(mag.device)


def sample_positions(
    top: torch.Tensor, d: int, alpha: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomized top-k positions (sorted int64) given the sorted top-k positions ``top``.

    Same distribution as ``torch.multinomial(p, k, replacement=False)`` with the weights of the
    module docstring.
    """
    k = top.numel()
    n_rest = d - k
    if k == 0 or n_rest == 0 or alpha == 0.0:
        return top
    w_top = (1.0 - alpha) / k
    w_rest = alpha / n_rest
    m = min(k, n_rest)
    z = torch.empty(k + m, dtype=torch.float64).exponential_(generator=generator)
    keys_top = torch.cumsum(z[:k] / (w_top * torch.arange(k, 0, -1, dtype=torch.float64)), 0)
    keys_rest = torch.cumsum(
        z[k:] / (w_rest * torch.arange(n_rest, n_rest - m, -1, dtype=torch.float64)), 0
    )
    smallest = torch.topk(torch.cat([keys_top, keys_rest]), k, largest=False).indices
    c = int((smallest >= k).sum())  # how many kept positions lie outside the top-k set
    if c == 0:
        return top
    keep_top = top[torch.randperm(k, generator=generator)[: k - c]]
    ranks = _distinct_uniform(n_rest, c, generator)
    # The r-th position outside `top` (0-based) is r + #{j : top[j] - j <= r}.
    gaps = top - torch.arange(k)
    rest = ranks + torch.searchsorted(gaps, ranks, right=True)
    return torch.sort(torch.cat([keep_top, rest])).values


def _distinct_uniform(n: int, c: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random set of c distinct integers in [0, n) (as int64, any order)."""
    if 4 * c >= n or n <= 4096:
        return torch.randperm(n, generator=generator)[:c]
    # The first c distinct values of an i.i.d. uniform stream form a uniform c-subset.
    draws = torch.empty(0, dtype=torch.int64)
    extra = c + 2 * (c * c) // n + 16
    while True:
        draws = torch.cat([draws, torch.randint(0, n, (extra,), generator=generator)])
        uniq, inverse = torch.unique(draws, return_inverse=True)
        if uniq.numel() >= c:
            break
        extra = 2 * (c - uniq.numel()) + 16
    first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
    return uniq[torch.argsort(first)[:c]]
