"""Randomized Top-k (Zheng et al., IJCAI 2023): sampling rule, reproducibility, inference mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from flwr_splitms.codecs import decode_bytes, get_codec
from flwr_splitms.codecs.randtopk import sample_positions
from flwr_splitms.codecs.selection import keep_count


def activations(seed: int, shape: tuple[int, ...] = (4, 32, 8, 8)) -> torch.Tensor:
    return torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def kept_mask(codec_name: str, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    codec = get_codec(codec_name, ratio=0.95)
    return decode_bytes(codec.encode(x, **kwargs).to_bytes()) != 0  # type: ignore[arg-type]


def test_reproducible_with_seeded_generator() -> None:
    x = activations(0)
    codec = get_codec("rt", ratio=0.95, alpha=0.3)
    a = codec.encode(x, generator=torch.Generator().manual_seed(42)).to_bytes()
    b = codec.encode(x, generator=torch.Generator().manual_seed(42)).to_bytes()
    c = codec.encode(x, generator=torch.Generator().manual_seed(43)).to_bytes()
    assert a == b
    assert a != c


def test_global_rng_when_no_generator() -> None:
    x = activations(1)
    codec = get_codec("rt", ratio=0.95, alpha=0.3)
    torch.manual_seed(7)
    a = codec.encode(x).to_bytes()
    torch.manual_seed(7)
    b = codec.encode(x).to_bytes()
    assert a == b


def test_alpha_keeps_non_top_elements_sometimes() -> None:
    x = activations(2)
    top = kept_mask("sp", x)
    k = int(top.sum())
    g = torch.Generator().manual_seed(0)
    outside = []
    for _ in range(20):
        kept = kept_mask("rt", x, generator=g)
        assert int(kept.sum()) <= k  # a kept zero activation decodes as zero
        outside.append(int((kept & ~top).sum()))
    assert max(outside) > 0
    # alpha = 0.1 of the first draw's weight lies outside the top-k; successive sampling
    # without replacement raises that share as the top-k weight is used up
    assert 0.05 * k < sum(outside) / len(outside) < 0.4 * k


def test_inference_mode_equals_top_k() -> None:
    x = activations(3) - 0.3
    rt = get_codec("rt", ratio=0.95, alpha=0.5)
    sp = get_codec("sp", ratio=0.95)
    p_rt = rt.encode(x, train=False, generator=torch.Generator().manual_seed(0))
    p_sp = sp.encode(x)
    assert p_rt.sections == p_sp.sections and p_rt.flags == p_sp.flags
    assert torch.equal(rt.decode(p_rt), sp.decode(p_sp))


def test_alpha_zero_equals_top_k() -> None:
    x = activations(4)
    rt = get_codec("rt", ratio=0.9, alpha=0.0)
    assert rt.encode(x).sections == get_codec("sp", ratio=0.9).encode(x).sections


def test_kept_values_exact_and_positions_distinct() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    codec = get_codec("rt", ratio=0.9, alpha=0.5)
    y = decode_bytes(codec.encode(x, generator=torch.Generator().manual_seed(1)).to_bytes())
    kept = y != 0
    assert int(kept.sum()) == keep_count(0.9, 1000)
    assert torch.equal(y[kept], x[kept])


def successive_sampling_law(d: int, top: set[int], k: int, alpha: float) -> dict[frozenset, float]:
    """Exact law of torch.multinomial(p, k, replacement=False) for the RT weights."""
    w = [(1 - alpha) / k if i in top else alpha / (d - k) for i in range(d)]
    law: dict[frozenset, float] = {}
    for order in itertools.permutations(range(d), k):
        p, left = 1.0, sum(w)
        for i in order:
            p *= w[i] / left
            left -= w[i]
        key = frozenset(order)
        law[key] = law.get(key, 0.0) + p
    return law


@pytest.mark.parametrize(("d", "k", "alpha"), [(5, 2, 0.3), (6, 3, 0.6), (4, 3, 0.5)])
def test_sampler_matches_successive_sampling(d: int, k: int, alpha: float) -> None:
    top = torch.arange(d - k, d)  # any sorted set works; take the last k positions
    law = successive_sampling_law(d, set(top.tolist()), k, alpha)
    n = 4000
    g = torch.Generator().manual_seed(123)
    counts: dict[frozenset, int] = {}
    for _ in range(n):
        s = sample_positions(top, d, alpha, g)
        assert s.tolist() == sorted(set(s.tolist())) and s.numel() == k
        key = frozenset(s.tolist())
        counts[key] = counts.get(key, 0) + 1
    for subset, p in law.items():
        observed = counts.get(subset, 0) / n
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(observed - p) < 5 * sigma + 1e-3, (sorted(subset), observed, p)


def test_sampler_on_large_tensor_matches_multinomial() -> None:
    """Large d takes the rejection path for the non-top subset: same law as torch.multinomial."""
    d, k, alpha, runs = 200_000, 2_000, 0.1, 20
    top = torch.sort(torch.randperm(d, generator=torch.Generator().manual_seed(0))[:k]).values
    in_top = torch.zeros(d, dtype=torch.bool)
    in_top[top] = True
    weights = torch.full((d,), alpha / (d - k), dtype=torch.float64)
    weights[top] = (1 - alpha) / k
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(d)
    ours, reference = [], []
    for _ in range(runs):
        s = sample_positions(top, d, alpha, g)
        assert s.numel() == k and bool((s[1:] > s[:-1]).all())
        hits[s] += 1
        ours.append(int((~in_top[s]).sum()))
        reference.append(int((~in_top[torch.multinomial(weights, k, generator=g)]).sum()))
    # successive sampling exhausts the top-k weight, so more than alpha * k come from outside
    mean_ours, mean_ref = sum(ours) / runs, sum(reference) / runs
    assert alpha * k < mean_ours < 3 * alpha * k
    assert abs(mean_ours - mean_ref) < 25  # about 5 standard errors
    # non-top picks spread over the whole index range, not clustered at small indices
    rest_hits = torch.nonzero((hits > 0) & ~in_top).squeeze(1).float()
    assert 0.4 * d < float(rest_hits.mean()) < 0.6 * d
