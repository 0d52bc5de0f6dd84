"""Codecs on any device and any activation layout, and ``encode_measured``.

The codecs run in torch on the tensor's own device; the wire bytes are the same everywhere
(``test_codecs_golden`` pins them to the original numpy implementation). Here: the ``device``
keyword of ``decode``/``decode_bytes``, the block-wise CPU path against the one-block path,
canonical tie breaking, CUDA against CPU (when a GPU is present), activations of every rank
and half precision, and the cheap error of ``encode_measured`` against a full decode.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_codecs_golden import GOLDEN, digest, key, settings

from flwr_splitms.codecs import (
    Payload,
    PayloadError,
    codec_names,
    compression_error,
    decode_bytes,
    get_codec,
    ms,
    selection,
)
from flwr_splitms.codecs.selection import keep_count

BASE = ("none", "qu", "sp", "rt", "ms")
CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("none", {}),
    ("qu", {"bits": 1}),
    ("qu", {"bits": 3}),
    ("qu", {"bits": 8}),
    ("qu", {"bits": 13}),
    ("sp", {"ratio": 0.5}),
    ("sp", {"ratio": 0.99}),
    ("rt", {"ratio": 0.9, "alpha": 0.3}),
    ("ms", {}),
    ("ms", {"bits": 1, "rounding": "floor"}),
    ("ms", {"bits": 3, "scope": "sample"}),
    ("ms", {"bits": 4, "signed": True}),
    ("ms", {"bits": 7, "ratio": 0.5}),
    ("ms", {"bits": 8, "scope": "sample", "rounding": "floor"}),
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def config_id(config: tuple[str, dict[str, object]]) -> str:
    return key(*config)


# -- the device keyword ------------------------------------------------------------------


def test_decode_device_keyword() -> None:
    x = torch.randn(4, 9)
    for name in BASE:
        codec = get_codec(name)
        payload = codec.encode(x)
        blob = payload.to_bytes()
        for device in (None, "cpu", torch.device("cpu")):
            y = codec.decode(payload, device=device)
            assert y.device.type == "cpu" and y.shape == x.shape
            assert torch.equal(decode_bytes(blob, device=device), y)
        with pytest.raises(ValueError, match="invalid device"):
            codec.decode(payload, device="no-such-device")


def test_narrowed_selection_matches_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled-threshold selection on short rows: same bytes as before."""
    monkeypatch.setattr(selection, "_NARROW_MIN", 64)
    monkeypatch.setattr(selection, "_SAMPLE", 16)
    for name, params in settings():
        if name in ("sp", "rt") or (name == "ms" and params["bits"] == 3):
            assert digest(name, params) == GOLDEN[key(name, params)], (name, params)


@pytest.mark.parametrize("scope", ["tensor", "sample"])
def test_block_wise_cpu_path_matches_one_block(scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(12, 7, 5, generator=g), torch.rand(5, 3, 61, generator=g).half()]
    codecs = [
        get_codec("ms", ratio=0.8, bits=b, scope=scope, rounding=r)
        for b in range(1, 9)
        for r in ("nearest", "floor")
    ]
    one_block = [c.encode_measured(x) for c in codecs for x in xs]
    monkeypatch.setattr(ms, "_BLOCK", 64)
    blocked = [c.encode_measured(x) for c in codecs for x in xs]
    for (p1, e1), (p2, e2) in zip(one_block, blocked, strict=True):
        assert p1 == p2 and math.isclose(e1, e2, rel_tol=1e-6)


def test_ties_keep_the_lowest_positions() -> None:
    x = torch.tensor([0.5, 2.0, 1.0, 2.0, 2.0, 0.0, 2.0, 1.0])
    for name in ("sp", "ms"):
        codec = get_codec(name, ratio=0.75)  # k = 2 of four tied 2.0
        y = codec.decode(codec.encode(x))
        assert y[[1, 3]].tolist() == [2.0, 2.0] and y[[4, 6]].abs().max() < 2.0
    relu = torch.relu(torch.randn(1 << 19, generator=torch.Generator().manual_seed(0)))
    relu[: 1 << 18] = 0.0  # half zeros; k larger than the positives: ties at 0
    idx = selection.top_indices(relu.unsqueeze(0), (1 << 18) + 5)[0]
    assert idx[:5].tolist() == [0, 1, 2, 3, 4] and idx.numel() == (1 << 18) + 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bytes_and_values_equal_cpu() -> None:
    for name, params in settings():
        assert digest(name, params, device="cuda") == GOLDEN[key(name, params)], (name, params)
    x = torch.relu(torch.randn(8, 16, 32, 32, generator=torch.Generator().manual_seed(1)))
    for name, params in CONFIGS:
        codec = get_codec(name, **params)
        gen = torch.Generator().manual_seed(5)
        blob = codec.encode(x.cuda(), generator=gen).to_bytes()
        assert blob == codec.encode(x, generator=torch.Generator().manual_seed(5)).to_bytes()
        y = decode_bytes(blob, device="cuda")
        assert y.device.type == "cuda" and torch.equal(y.cpu(), decode_bytes(blob))
        _, err = codec.encode_measured(x.cuda(), generator=torch.Generator().manual_seed(5))
        assert math.isclose(err, compression_error(x, y.cpu()), rel_tol=1e-6, abs_tol=1e-12)


# -- activations of any rank, half precision --------------------------------------------


def expected_nbytes(name: str, params: dict[str, object], x: torch.Tensor, sign: int) -> int:
    d, item = x.numel(), x.element_size()
    if name == "none":
        return d * item
    if name == "qu":
        return -(-d * int(params["bits"]) // 8) + 8  # type: ignore[call-overload]
    codec = get_codec(name, **params)
    ratio = float(codec.params["ratio"])  # type: ignore[arg-type]
    if name in ("sp", "rt"):
        k = keep_count(ratio, d)
        return min(-(-d // 8), 4 * k) + k * item
    bits = int(codec.params["bits"])  # type: ignore[call-overload]
    rows = x.shape[0] if codec.params["scope"] == "sample" and x.dim() else 1
    kept = rows * keep_count(ratio, d // rows)
    return -(-d * (bits + sign) // 8) + kept * item


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37,), (6, 50), (3, 7, 24), (2, 3, 5, 7), (2, 1, 3, 2, 5)])
def test_any_rank_and_dtype_round_trip(
    config: tuple[str, dict[str, object]], dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    name, params = config
    codec = get_codec(name, **params)
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g).to(dtype)
    if name == "ms" and params.get("signed") is not True:
        x = torch.relu(x)  # the usual cut-layer input; no sign bit
    payload = codec.encode(x, generator=g)
    y = decode_bytes(payload.to_bytes())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert payload.nbytes == expected_nbytes(
        name, params, x, payload.flags & 1 if name == "ms" else 0
    )
    if name == "none":
        assert torch.equal(y, x)
    if name in ("sp", "rt", "ms"):  # kept values travel exactly
        kept = y == x
        assert int(kept.sum()) >= keep_count(float(codec.params["ratio"]), x.numel()) // (  # type: ignore[arg-type]
            x.shape[0] if codec.params.get("scope") == "sample" else 1
        )
    if name == "qu":
        step = (x.float().max() - x.float().min()) / ((1 << int(params["bits"])) - 1)  # type: ignore[call-overload]
        tol = float(step) / 2 + float(x.float().abs().max()) * 2**-7
        assert float((y.float() - x.float()).abs().max()) <= tol


# -- encode_measured ---------------------------------------------------------------------


def measured_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    xs = [
        torch.relu(torch.randn(4, 8, 6, 6, generator=g)),
        torch.randn(5, 33, generator=g),
        torch.randn(3, 4, 10, generator=g).half(),
        torch.relu(torch.randn(2, 50, generator=g)).bfloat16(),
        torch.randn(17, generator=g) * 1e25,  # float32 squares overflow: exact fallback
        torch.randn(17, generator=g) * 1e-25,  # ... and underflow
        torch.randint(0, 3, (4, 16), generator=g).float(),  # ties
        torch.zeros(3, 5),
        torch.full((7,), -2.5),
        torch.tensor(3.0),
        torch.zeros(2, 0),
        torch.rand(1, 300_000, generator=g),  # the narrowing and block paths
    ]
    return xs


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_encode_measured_equals_compression_error(config: tuple[str, dict[str, object]]) -> None:
    name, params = config
    codec = get_codec(name, **params)
    for x in measured_inputs():
        if name == "ms" and params.get("signed") is False and bool((x < 0).any()):
            continue
        payload, err = codec.encode_measured(x, generator=torch.Generator().manual_seed(2))
        expected = compression_error(x, codec.decode(payload))
        assert payload == codec.encode(x, generator=torch.Generator().manual_seed(2))
        if math.isinf(expected):
            assert math.isinf(err)
        else:
            assert math.isclose(err, expected, rel_tol=1e-6, abs_tol=1e-12), (x.shape, x.dtype)


def test_encode_measured_every_registered_codec() -> None:
    """New codecs inherit the default (encode, decode, compare) and must agree too."""
    x = torch.relu(torch.randn(4, 30, generator=torch.Generator().manual_seed(0)))
    for name in codec_names():
        codec = get_codec(name)
        payload, err = codec.encode_measured(x, generator=torch.Generator().manual_seed(0))
        assert isinstance(payload, Payload) and isinstance(err, float)
        assert math.isclose(err, compression_error(x, codec.decode(payload)), rel_tol=1e-6)
    assert get_codec("none").encode_measured(x)[1] == 0.0
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_codec("ms").encode_measured(torch.tensor([1.0, math.nan]))
    with pytest.raises(PayloadError):
        get_codec("ms").decode(get_codec("sp").encode(x))
