"""Mask-Encoded Sparsification: the paper's Fig. 1, Algorithms 1-2, options and error claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_splitms.codecs import Payload, compression_error, decode_bytes, get_codec
from flwr_splitms.codecs.selection import keep_count

# Fig. 1 style example: 16 floats, Top-4 (ratio 0.75), 2-bit mask, Top_min = 2.1, so the
# filtered values map onto the segments [0, 0.7), [0.7, 1.4), [1.4, 2.1) -> 0, 0.7, 1.4.
# (The figure's own numbers are not in the paper text; this example follows its description.)
FIG1 = [0.3, 2.5, 0.9, 0.0, 1.5, 0.2, 3.0, 1.1, 0.6, 2.1, 1.8, 0.0, 4.2, 0.8, 1.3, 0.5]
FIG1_CODES_FLOOR = [0, 3, 1, 0, 2, 0, 3, 1, 0, 3, 2, 0, 3, 1, 1, 0]
FIG1_CODES_NEAREST = [0, 3, 1, 0, 2, 0, 3, 2, 1, 3, 2, 0, 3, 1, 2, 1]


def reference_ms(x: torch.Tensor, ratio: float, bits: int, rounding: str) -> torch.Tensor:
    """Algorithms 1 and 2 written densely, the way the authors' code works (no packing)."""
    flat = x.float().reshape(-1)
    mag = flat.abs()
    k = keep_count(ratio, flat.numel())
    top = (1 << bits) - 1
    vals, idx = torch.topk(mag, k)
    top_min = vals[-1]
    q = mag * (top / top_min) if top_min > 0 else torch.zeros_like(mag)
    q = torch.round(q) if rounding == "nearest" else torch.floor(q)
    q = q.clamp(max=top - 1)
    q[idx] = top
    out = q * (top_min / top)
    out = torch.where(flat < 0, -out, out)
    out[idx] = flat[idx]
    return out.reshape(x.shape)


def codes_of(payload: Payload, bits: int) -> list[int]:
    data = np.frombuffer(payload.sections[0], dtype=np.uint8)
    stream = np.unpackbits(data, bitorder="little")
    return [int(sum(int(stream[i * bits + j]) << j for j in range(bits))) for i in range(16)]


def test_fig1_twenty_bytes_and_floor_decoding() -> None:
    x = torch.tensor(FIG1).reshape(4, 4)
    codec = get_codec("ms", ratio=0.75, bits=2, rounding="floor")
    payload = codec.encode(x)
    assert payload.nbytes == 20  # 16 x 2-bit mask = 4 bytes, 4 float32 values = 16 bytes
    assert payload.raw_nbytes == 64
    assert [len(s) for s in payload.sections] == [4, 16]
    assert codes_of(payload, 2) == FIG1_CODES_FLOOR
    # the values vector holds the top values in their original order
    assert np.frombuffer(payload.sections[1], dtype="<f4").tolist() == pytest.approx(
        [2.5, 3.0, 2.1, 4.2]
    )
    y = decode_bytes(payload.to_bytes()).reshape(-1)
    step = np.float32(2.1) / 3
    expected = [c * step if c < 3 else v for c, v in zip(FIG1_CODES_FLOOR, FIG1, strict=True)]
    assert y.tolist() == pytest.approx(expected, rel=1e-6)
    # every filtered value lands on 0, 0.7 or 1.4 and never above its true value
    filtered = [i for i, c in enumerate(FIG1_CODES_FLOOR) if c < 3]
    assert {round(float(y[i]), 4) for i in filtered} <= {0.0, 0.7, 1.4}
    assert all(float(y[i]) <= FIG1[i] + 1e-6 for i in filtered)


def test_fig1_nearest_rounding_and_error_vs_topk() -> None:
    x = torch.tensor(FIG1).reshape(4, 4)
    ms = get_codec("ms", ratio=0.75, bits=2)  # nearest, as the authors' code
    payload = ms.encode(x)
    assert payload.nbytes == 20
    assert codes_of(payload, 2) == FIG1_CODES_NEAREST
    y = ms.decode(payload)
    assert torch.allclose(y, reference_ms(x, 0.75, 2, "nearest"))
    sp = get_codec("sp", ratio=0.75)
    y_sp = sp.decode(sp.encode(x))
    err_ms = float(torch.linalg.vector_norm(x - y))
    err_sp = float(torch.linalg.vector_norm(x - y_sp))
    assert err_ms < err_sp / 3  # the figure's point: 4.06 -> 1.02 on its example


def test_ties_at_top_min_keep_exactly_k() -> None:
    x = torch.tensor([5.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 2.0, 2.0, 0.5])
    for rounding in ("nearest", "floor"):
        codec = get_codec("ms", ratio=0.8, bits=2, rounding=rounding)  # k = 2
        payload = codec.encode(x)
        assert len(payload.sections[1]) == 2 * 4
        y = decode_bytes(payload.to_bytes())
        assert float(y[0]) == 5.0
        assert int((y == 2.0).sum()) == 1  # one of the six tied 2.0 is kept
        tied = (x == 2.0) & (y != 2.0)
        assert torch.allclose(y[tied], torch.full((5,), 2.0 * 2 / 3))


def test_ties_everywhere_with_many_kept() -> None:
    x = torch.tensor([1.0] * 50 + [0.0] * 50)
    codec = get_codec("ms", ratio=0.9, bits=3)
    y = decode_bytes(codec.encode(x).to_bytes())
    assert int((y == 1.0).sum()) == 10
    assert torch.allclose(y[:50][y[:50] != 1.0], torch.full((40,), 6 / 7))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 300),
    ratio=st.floats(0.05, 0.99),
    bits=st.integers(1, 8),
    rounding=st.sampled_from(["nearest", "floor"]),
    signed=st.booleans(),
)
def test_matches_dense_reference(
    seed: int, n: int, ratio: float, bits: int, rounding: str, signed: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if not signed:
        x = x.relu()
    codec = get_codec("ms", ratio=ratio, bits=bits, rounding=rounding)
    y = decode_bytes(codec.encode(x).to_bytes())
    assert torch.equal(y, reference_ms(x, ratio, bits, rounding))


def relu_batch(seed: int, shape: tuple[int, ...] = (8, 64, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    channel_bias = 0.1 * torch.randn((*shape[:2], 1, 1), generator=g)
    return torch.relu(torch.randn(shape, generator=g) + channel_bias)


@pytest.mark.parametrize("ratio", [0.7, 0.9, 0.99])
def test_ms_error_below_sp_error_at_same_ratio(ratio: float) -> None:
    x = relu_batch(0)
    errors = {}
    for name in ("sp", "ms"):
        codec = get_codec(name, ratio=ratio)
        errors[name] = compression_error(x, codec.decode(codec.encode(x)))
    assert errors["ms"] < errors["sp"]
    assert errors["ms"] < 0.5 * errors["sp"]


def test_ms_error_below_sp_and_qu_at_equal_traffic() -> None:
    """Paper Sec. 4.2: at the same bytes (MS 0.99/2 bits = SP 95.875% = QU 2.32 bits)."""
    x = relu_batch(1)
    ms = get_codec("ms", ratio=0.99, bits=2)
    sp = get_codec("sp", ratio=0.95875)
    qu = get_codec("qu", bits=2)  # the nearest integer width below 2.32 bits
    p_ms, p_sp, p_qu = ms.encode(x), sp.encode(x), qu.encode(x)
    assert abs(p_ms.nbytes - p_sp.nbytes) / p_ms.nbytes < 0.01
    assert p_qu.nbytes < p_ms.nbytes
    e_ms = compression_error(x, ms.decode(p_ms))
    assert e_ms < compression_error(x, sp.decode(p_sp))
    assert e_ms < compression_error(x, qu.decode(p_qu))


@pytest.mark.parametrize("signed", [False, True])
def test_eight_bits_near_lossless(signed: bool) -> None:
    x = relu_batch(2)
    if signed:
        x = x - x.mean()
    codec = get_codec("ms", ratio=0.99, bits=8)
    assert compression_error(x, decode_bytes(codec.encode(x).to_bytes())) < 1e-2


def test_signed_auto_adds_a_sign_bit_only_when_needed() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 50, generator=g)
    d, k = x.numel(), keep_count(0.9, x.numel())
    auto = get_codec("ms", ratio=0.9, bits=2)
    p = auto.encode(x)
    assert p.flags == 1 and p.nbytes == math.ceil(d * 3 / 8) + 4 * k
    y = auto.decode(p)
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())
    assert compression_error(x, y) < compression_error(x, x.relu())
    p_pos = auto.encode(x.abs())
    assert p_pos.flags == 0 and p_pos.nbytes == math.ceil(d * 2 / 8) + 4 * k
    forced = get_codec("ms", ratio=0.9, bits=2, signed=True).encode(x.abs())
    assert forced.flags == 1 and forced.nbytes == p.nbytes
    assert torch.equal(decode_bytes(forced.to_bytes()), auto.decode(p_pos))
    with pytest.raises(ValueError, match="signed='auto'"):
        get_codec("ms", signed=False).encode(x)
    unsigned = get_codec("ms", ratio=0.9, signed=False)
    assert torch.equal(unsigned.decode(unsigned.encode(x.abs())), auto.decode(p_pos))


def test_signed_topk_is_by_magnitude() -> None:
    x = torch.tensor([-9.0, 1.0, 0.5, -0.25, 8.0, 0.0, -3.0, 2.0])
    y = decode_bytes(get_codec("ms", ratio=0.75, bits=2).encode(x).to_bytes())
    assert y[0] == -9.0 and y[4] == 8.0
    # others: q * 8 / 3 with the sign: -3 -> round(1.125) = 1 -> -2.667, 2 -> round(.75) = 1
    assert y.tolist() == pytest.approx([-9.0, 0, 0, 0, 8.0, 0, -8 / 3, 8 / 3], abs=1e-6)


def test_nine_bit_codes_with_sign() -> None:
    x = torch.randn(3, 333, generator=torch.Generator().manual_seed(4))
    p = get_codec("ms", ratio=0.9, bits=8).encode(x)
    assert len(p.sections[0]) == math.ceil(x.numel() * 9 / 8)
    y = decode_bytes(p.to_bytes())
    assert torch.equal(y, reference_ms(x, 0.9, 8, "nearest"))


def test_rounding_modes_differ_as_specified() -> None:
    x = relu_batch(5, (4, 8, 8, 8))
    errors = {}
    for rounding in ("nearest", "floor"):
        codec = get_codec("ms", ratio=0.95, bits=2, rounding=rounding)
        y = decode_bytes(codec.encode(x).to_bytes())
        assert torch.equal(y, reference_ms(x, 0.95, 2, rounding))
        errors[rounding] = compression_error(x, y)
    # floor never rounds a filtered value up
    y_floor = decode_bytes(get_codec("ms", ratio=0.95, rounding="floor").encode(x).to_bytes())
    assert bool((y_floor <= x + 1e-6).all())
    assert errors["nearest"] < errors["floor"]


def test_sample_scope_keeps_per_sample_top_k() -> None:
    g = torch.Generator().manual_seed(6)
    small = torch.rand(1, 4, 10, 10, generator=g) * 0.01
    large = torch.rand(1, 4, 10, 10, generator=g) * 100.0
    x = torch.cat([small, large])
    per_sample = get_codec("ms", ratio=0.9, bits=2, scope="sample")
    whole = get_codec("ms", ratio=0.9, bits=2, scope="tensor")
    p = per_sample.encode(x)
    assert p.nbytes == math.ceil(800 * 2 / 8) + 4 * 2 * keep_count(0.9, 400)
    y_s, y_t = per_sample.decode(p), whole.decode(whole.encode(x))
    # each sample keeps its own 40 values and has its own Top_min
    for i in range(2):
        assert int((y_s[i] == x[i]).sum()) >= 40
        ref = reference_ms(x[i], 0.9, 2, "nearest")
        assert torch.equal(y_s[i], ref)
    # the tensor-wide top-k spends everything on the large sample: the small one is lost
    assert compression_error(x[0], y_t[0]) > 0.9
    assert compression_error(x[0], y_s[0]) < 0.3


def test_sample_scope_edge_shapes() -> None:
    codec = get_codec("ms", ratio=0.5, scope="sample")
    for shape in [(), (5,), (3, 1), (0, 4), (2, 0), (1, 7)]:
        x = torch.rand(shape)
        y = decode_bytes(codec.encode(x).to_bytes())
        assert y.shape == x.shape
    x = torch.rand(5)  # 1-d: every element is a sample of one, kept exactly
    assert torch.equal(decode_bytes(codec.encode(x).to_bytes()), x)


def test_tiny_magnitudes_do_not_overflow() -> None:
    x = torch.tensor([1e-39, 3e-40, 0.0, 2e-39, 5e-45, 1e-38, 0.0, 4e-39])  # subnormals
    for rounding in ("nearest", "floor"):
        y = decode_bytes(
            get_codec("ms", ratio=0.75, bits=2, rounding=rounding).encode(x).to_bytes()
        )
        assert bool(torch.isfinite(y).all())
        assert float((x - y).abs().max()) <= 1e-38


def test_huge_magnitudes() -> None:
    x = torch.tensor([3e38, -3e38, 1e38, 2.5e38, 0.0, 1.0, -2e38, 3.3e38])
    for name in ("ms", "qu", "sp"):
        codec = get_codec(name, **({"ratio": 0.5} if name != "qu" else {"bits": 8}))
        y = decode_bytes(codec.encode(x).to_bytes())
        assert bool(torch.isfinite(y).all())
        assert compression_error(x, y) < 0.5


def test_large_activation_batch_uses_exact_top_k() -> None:
    """The sampled-threshold top-k (long rows) keeps exactly the top-k magnitudes."""
    x = relu_batch(7, (16, 64, 32, 32))
    d = x.numel()
    k = keep_count(0.99, d)
    y = get_codec("ms").decode(get_codec("ms").encode(x))
    kept = y == x
    kept &= x > 0
    assert int(kept.sum()) >= k
    kth = torch.topk(x.reshape(-1), k).values[-1]
    assert bool((x[y != x] <= kth).all())
    assert compression_error(x, y) < 0.3
