"""Round trips of every codec on random shapes and dtypes, and byte counts against the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_splitms.codecs import Payload, compression_error, decode_bytes, get_codec
from flwr_splitms.codecs.selection import keep_count

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ITEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
KINDS = ["relu", "signed", "constant", "zeros", "ties", "wide"]


def make_tensor(seed: int, shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> torch.Tensor:
    """Deterministic test data of a few shapes of distribution."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    if kind == "relu":
        a = np.maximum(rng.standard_normal(n), 0)
    elif kind == "signed":
        a = rng.standard_normal(n) * 3
    elif kind == "constant":
        a = np.full(n, rng.uniform(-5, 5))
    elif kind == "zeros":
        a = np.zeros(n)
    elif kind == "ties":
        a = rng.integers(-2, 3, n).astype(np.float64)
    else:  # wide dynamic range
        a = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 4, n)
    return torch.from_numpy(a.astype(np.float32)).reshape(shape).to(dtype)


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)
ratios = st.floats(0.01, 0.99)
codec_specs: st.SearchStrategy[tuple[str, dict[str, object]]] = st.one_of(
    st.just(("none", {})),
    st.builds(lambda b: ("qu", {"bits": b}), st.integers(1, 16)),
    st.builds(lambda r: ("sp", {"ratio": r}), ratios),
    st.builds(lambda r, a: ("rt", {"ratio": r, "alpha": a}), ratios, st.floats(0.0, 0.9)),
    st.builds(
        lambda r, b, rd, sg, sc: (
            "ms",
            {"ratio": r, "bits": b, "rounding": rd, "signed": sg, "scope": sc},
        ),
        ratios,
        st.integers(1, 8),
        st.sampled_from(["nearest", "floor"]),
        st.sampled_from(["auto", True]),
        st.sampled_from(["tensor", "sample"]),
    ),
)


def expected_nbytes(name: str, params: dict[str, object], x: torch.Tensor) -> int:
    """The data-section formulas of the design (values in the input dtype)."""
    d = x.numel()
    f = ITEM[x.dtype]
    if name == "none":
        return f * d
    if name == "qu":
        return math.ceil(d * int(params["bits"]) / 8) + 8  # type: ignore[call-overload]
    ratio = float(params["ratio"])  # type: ignore[arg-type]
    if name in ("sp", "rt"):
        k = keep_count(ratio, d)
        return min(math.ceil(d / 8), 4 * k) + f * k
    s = int(params["signed"] is True or bool((x < 0).any()))
    b = int(params["bits"])  # type: ignore[call-overload]
    if params["scope"] == "sample" and x.dim() >= 1 and d > 0:
        k = x.shape[0] * keep_count(ratio, d // x.shape[0])
    else:
        k = keep_count(ratio, d)
    return math.ceil(d * (b + s) / 8) + f * k


def check_semantics(name: str, params: dict[str, object], x: torch.Tensor, y: torch.Tensor) -> None:
    """Per-codec properties of the reconstruction."""
    xf, yf = x.float().reshape(-1), y.float().reshape(-1)
    d = xf.numel()
    eps = torch.finfo(x.dtype).eps
    if name == "none":
        assert torch.equal(x, y)
    elif name == "qu":
        if d:
            lo, hi = float(xf.min()), float(xf.max())
            step = (hi - lo) / ((1 << int(params["bits"])) - 1)  # type: ignore[call-overload]
            tol = step / 2 + 2 * eps * xf.abs().max() + 1e-30
            assert float((xf - yf).abs().max()) <= tol
            if hi == lo:
                assert torch.equal(x, y)
    elif name in ("sp", "rt"):
        kept = yf != 0
        assert torch.equal(yf[kept], xf[kept])  # kept values are exact
        assert int(kept.sum()) <= keep_count(float(params["ratio"]), d)  # type: ignore[arg-type]
        if name == "sp" and d:
            k = keep_count(float(params["ratio"]), d)  # type: ignore[arg-type]
            kth = torch.topk(xf.abs(), k).values[-1]
            assert bool((yf[~kept] == 0).all())
            assert bool((xf[~kept].abs() <= kth).all())
    else:  # ms: kept exact, others within one step of Top_min / (2^b - 1), correct sign
        b = int(params["bits"])  # type: ignore[call-overload]
        rows = x.shape[0] if params["scope"] == "sample" and x.dim() >= 1 else 1
        if d == 0:
            return
        xr, yr = xf.view(rows, -1), yf.view(rows, -1)
        k = keep_count(float(params["ratio"]), xr.shape[1])  # type: ignore[arg-type]
        top_min = torch.topk(xr.abs(), k, dim=1).values[:, -1:]
        step = top_min / ((1 << b) - 1)
        tol = step * (1 + 1e-5) + 2 * eps * xr.abs()
        assert bool(((xr - yr).abs() <= tol).all())
        assert bool((yr * xr >= 0).all())  # never the wrong sign


@settings(max_examples=150, deadline=None)
@given(
    spec=codec_specs,
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_round_trip(
    spec: tuple[str, dict[str, object]],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    kind: str,
    seed: int,
) -> None:
    name, params = spec
    codec = get_codec(name, **params)
    x = make_tensor(seed, shape, dtype, kind)
    payload = codec.encode(x, generator=torch.Generator().manual_seed(seed))
    assert payload.codec == name and payload.params == codec.params
    assert payload.shape == tuple(shape) and payload.dtype == dtype
    assert payload.nbytes == expected_nbytes(name, codec.params, x)
    assert payload.raw_nbytes == x.numel() * ITEM[dtype]
    blob = payload.to_bytes()
    assert len(blob) == payload.nbytes + payload.header_nbytes
    assert Payload.from_bytes(blob) == payload
    y = decode_bytes(blob)
    assert y.shape == x.shape and y.dtype == dtype and y.device.type == "cpu"
    assert torch.equal(y, codec.decode(payload))
    check_semantics(name, codec.params, x, y)


@pytest.mark.parametrize("name", ["none", "qu", "sp", "rt", "ms"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (1, 1, 1)])
def test_tiny_and_empty_tensors(name: str, shape: tuple[int, ...]) -> None:
    x = torch.full(shape, 1.5)
    codec = get_codec(name)
    y = decode_bytes(codec.encode(x).to_bytes())
    assert y.shape == x.shape
    assert torch.equal(y, x)  # single elements are kept (k >= 1) or quantized exactly


@pytest.mark.parametrize("name", ["none", "qu", "sp", "rt", "ms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_tensor_round_trips_exactly(name: str, dtype: torch.dtype) -> None:
    x = torch.zeros(4, 3, 5, dtype=dtype)
    y = decode_bytes(get_codec(name).encode(x).to_bytes())
    assert torch.equal(y, x) and y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [-2.75, 0.0, 3.0, 1e-3])
def test_constant_tensor_qu_exact(dtype: torch.dtype, value: float) -> None:
    x = torch.full((5, 7), value, dtype=dtype)
    assert torch.equal(decode_bytes(get_codec("qu", bits=1).encode(x).to_bytes()), x)


def test_constant_tensor_ms_and_sp() -> None:
    x = torch.full((10, 10), 2.0)
    y = decode_bytes(get_codec("ms", ratio=0.9, bits=2).encode(x).to_bytes())
    kept = y == 2.0
    assert int(kept.sum()) == 10  # exactly k kept despite 100 ties
    assert torch.allclose(y[~kept], torch.full((90,), 2.0 * 2 / 3))
    y = decode_bytes(get_codec("sp", ratio=0.9).encode(x).to_bytes())
    assert int((y == 2.0).sum()) == 10 and int((y == 0).sum()) == 90


def test_float32_formulas_on_activation_batch() -> None:
    """The design's wire sizes for a ResNet18-shallow batch slice (8x64x32x32 float32)."""
    x = torch.relu(torch.randn(8, 64, 32, 32, generator=torch.Generator().manual_seed(0)))
    d = x.numel()
    k = math.floor(0.01 * d)
    assert get_codec("none").encode(x).nbytes == 4 * d
    assert get_codec("qu", bits=3).encode(x).nbytes == math.ceil(3 * d / 8) + 8
    assert get_codec("sp").encode(x).nbytes == min(math.ceil(d / 8), 4 * k) + 4 * k
    assert get_codec("rt").encode(x).nbytes == min(math.ceil(d / 8), 4 * k) + 4 * k
    ms = get_codec("ms").encode(x)
    assert ms.nbytes == math.ceil(2 * d / 8) + 4 * k
    # paper policy: ratio 0.99, 2 bits -> 2 + 32 * 0.01 = 2.32 bits per element, 92.75% saved
    assert 1 - ms.nbytes / ms.raw_nbytes == pytest.approx(0.9275, abs=1e-4)
    signed = get_codec("ms").encode(x - 0.5)
    assert signed.nbytes == math.ceil(3 * d / 8) + 4 * k


def test_sp_switches_between_bitmap_and_indices() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    # k = 100: 400 index bytes < 1250 bitmap bytes
    assert get_codec("sp", ratio=0.99).encode(x).nbytes == 400 + 400
    # k = 1000: bitmap (1250) < indices (4000)
    assert get_codec("sp", ratio=0.9).encode(x).nbytes == 1250 + 4000
    # break-even at ratio 1 - 1/32 = 96.875%: k = 312 -> 1248 < 1250 bytes of bitmap
    assert get_codec("sp", ratio=0.96875).encode(x).nbytes == 1248 + 1248
    for r in (0.99, 0.9, 0.96875, 0.96):
        c = get_codec("sp", ratio=r)
        y = c.decode(Payload.from_bytes(c.encode(x).to_bytes()))
        k = keep_count(r, x.numel())
        assert int((y != 0).sum()) == k


def test_half_precision_values_travel_in_input_dtype() -> None:
    x = torch.relu(torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2)))
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        p = get_codec("ms").encode(xd)
        k = keep_count(0.99, xd.numel())
        assert p.nbytes == math.ceil(2 * xd.numel() / 8) + 2 * k
        assert p.raw_nbytes == 2 * xd.numel()
        y = decode_bytes(p.to_bytes())
        assert y.dtype == dtype
        assert compression_error(xd, y) < 0.35


def test_keep_count() -> None:
    assert keep_count(0.99, 0) == 0
    assert keep_count(0.99, 1) == 1
    assert keep_count(0.99, 99) == 1  # floor(0.99) = 0 -> at least one
    assert keep_count(0.99, 100) == 1
    assert keep_count(0.9, 20) == 2  # despite (1 - 0.9) * 20 < 2 in floating point
    assert keep_count(0.75, 16) == 4
    assert keep_count(0.99, 64 * 64 * 32 * 32) == 41943
    assert keep_count(1e-9, 10) == 9
