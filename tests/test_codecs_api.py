"""Codec construction, parameters, input validation and the error metric."""

from __future__ import annotations

import math

import pytest
import torch

from flwr_splitms.codecs import (
    Codec,
    Payload,
    PayloadError,
    codec_names,
    compression_error,
    decode_bytes,
    get_codec,
    registry,
)
from flwr_splitms.codecs.halfprec import Float16

DEFAULTS = {
    "none": {},
    "qu": {"bits": 3},
    "sp": {"ratio": 0.99},
    "rt": {"ratio": 0.99, "alpha": 0.1},
    "ms": {
        "ratio": 0.99,
        "bits": 2,
        "rounding": "nearest",
        "signed": "auto",
        "scope": "tensor",
        "entropy": "none",
    },
    "fp16": {},
    "bf16": {},
}


def test_public_names_and_order() -> None:
    assert codec_names() == ("none", "qu", "sp", "rt", "ms", "fp16", "bf16")
    assert issubclass(PayloadError, ValueError)
    for name in codec_names():
        codec = get_codec(name)
        assert isinstance(codec, Codec)
        assert codec.name == name


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_defaults_and_rebuild(name: str) -> None:
    codec = get_codec(name)
    assert codec.params == DEFAULTS[name]
    rebuilt = get_codec(codec.name, **codec.params)
    assert rebuilt == codec and hash(rebuilt) == hash(codec)
    assert eval(repr(codec), {"get_codec": get_codec}) == codec
    codec.params["junk"] = 1  # params is a copy
    assert "junk" not in codec.params


def test_params_are_normalized() -> None:
    c = get_codec("ms", ratio=0.9, bits=3, rounding="floor", signed=True, scope="sample")
    assert c.params == {
        "ratio": 0.9,
        "bits": 3,
        "rounding": "floor",
        "signed": True,
        "scope": "sample",
        "entropy": "none",
    }
    assert get_codec("sp", ratio=1 / 2).params["ratio"] == 0.5
    assert get_codec("rt", alpha=0).params["alpha"] == 0.0


def test_unknown_codec_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'xx'; choose one of none, qu, sp, rt, ms"):
        get_codec("xx")
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec(None)  # type: ignore[arg-type]


def test_unknown_parameter_names_the_valid_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown parameter 'bit' for codec 'ms'; "
        r"valid: ratio, bits, rounding, signed, scope",
    ):
        get_codec("ms", bit=2)
    with pytest.raises(
        ValueError, match=r"unknown parameter 'ratio' for codec 'none'; valid: \(none\)"
    ):
        get_codec("none", ratio=0.5)
    with pytest.raises(ValueError, match="valid: ratio, alpha"):
        get_codec("rt", k=3)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("ms", {"ratio": 1.5}, r"ratio must be in \(0, 1\), got 1.5"),
        ("ms", {"ratio": 0}, r"ratio must be in \(0, 1\), got 0"),
        ("sp", {"ratio": 1.0}, r"ratio must be in \(0, 1\)"),
        ("sp", {"ratio": float("nan")}, r"ratio must be in \(0, 1\)"),
        ("sp", {"ratio": "0.5"}, r"ratio must be a number"),
        ("sp", {"ratio": True}, r"ratio must be a number"),
        ("ms", {"bits": 0}, r"bits must be in 1\.\.8, got 0"),
        ("ms", {"bits": 9}, r"bits must be in 1\.\.8, got 9"),
        ("ms", {"bits": 2.0}, r"bits must be an integer"),
        ("qu", {"bits": 17}, r"bits must be in 1\.\.16, got 17"),
        ("ms", {"rounding": "ceil"}, r"rounding must be one of 'nearest', 'floor'; got 'ceil'"),
        ("ms", {"signed": "yes"}, r"signed must be one of 'auto', True, False; got 'yes'"),
        ("ms", {"signed": 1}, r"signed must be one of"),
        ("ms", {"scope": "batch"}, r"scope must be one of 'tensor', 'sample'"),
        ("rt", {"alpha": 1.0}, r"alpha must be in \[0, 1\), got 1.0"),
        ("rt", {"alpha": -0.1}, r"alpha must be in \[0, 1\)"),
    ],
)
def test_invalid_parameter_values(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_codec(name, **params)


@pytest.mark.parametrize("name", list(DEFAULTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(name: str, bad: float) -> None:
    x = torch.rand(4, 5)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_codec(name).encode(x)
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_codec(name).encode(x.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8, torch.complex64])
def test_unsupported_dtype_raises(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        get_codec("ms").encode(torch.zeros(3, dtype=dtype))


def test_encode_rejects_non_tensors_and_sparse() -> None:
    with pytest.raises(TypeError):
        get_codec("sp").encode([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dense"):
        get_codec("sp").encode(torch.eye(3).to_sparse())


def test_encode_rejects_shapes_beyond_the_wire_limit() -> None:
    with pytest.raises(ValueError, match="too large"):
        get_codec("ms").encode(torch.empty(0, 2**40))
    with pytest.raises(ValueError, match="dimensions"):
        get_codec("ms").encode(torch.zeros((1,) * 33))


def test_encode_does_not_modify_input_and_ignores_autograd() -> None:
    x = torch.randn(8, 16, requires_grad=True)
    before = x.detach().clone()
    for name in codec_names():
        y = decode_bytes(get_codec(name).encode(x).to_bytes())
        assert not y.requires_grad
    assert torch.equal(x.detach(), before)


def test_non_contiguous_input() -> None:
    x = torch.randn(6, 8).t()
    for name in codec_names():
        codec = get_codec(name, **({"ratio": 0.5} if name in ("sp", "rt", "ms") else {}))
        y = codec.decode(codec.encode(x))
        assert y.shape == x.shape
    assert torch.equal(get_codec("none").decode(get_codec("none").encode(x)), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_decodes_on_cpu() -> None:
    x = torch.relu(torch.randn(4, 8, 8, device="cuda"))
    for name in codec_names():
        y = get_codec(name).decode(get_codec(name).encode(x))
        assert y.device.type == "cpu" and y.shape == x.shape


def test_decode_checks_codec_and_params() -> None:
    x = torch.rand(10, 10)
    payload = get_codec("sp", ratio=0.9).encode(x)
    with pytest.raises(PayloadError, match="encoded by codec 'sp', not 'ms'"):
        get_codec("ms").decode(payload)
    with pytest.raises(PayloadError, match="differ"):
        get_codec("sp", ratio=0.8).decode(payload)
    with pytest.raises(TypeError):
        get_codec("sp").decode(payload.to_bytes())  # type: ignore[arg-type]
    assert isinstance(payload, Payload)


class _Unmeasured(Float16):
    """fp16 whose encoder leaves the error to ``encode_measured`` (unregistered)."""

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
        measure: bool,
    ) -> tuple[Payload, float | None]:
        payload, _ = super()._encode(flat, shape, generator=generator, train=train, measure=measure)
        return payload, None


def test_encode_hook_may_leave_the_error_to_a_decode() -> None:
    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    codec = _Unmeasured()
    payload, err = codec.encode_measured(x)
    assert payload == get_codec("fp16").encode(x)
    assert err == compression_error(x, codec.decode(payload)) > 0
    assert err == pytest.approx(get_codec("fp16").encode_measured(x)[1], rel=1e-6)


def test_support_is_the_codecs_own() -> None:
    """``ms`` reads its support from the codes; the default is the nonzero decoded entries."""
    x = torch.tensor([[0.0, 0.05, 0.5, 1.0], [0.9, 0.0, 0.2, 0.1]])
    ms = get_codec("ms", ratio=0.75, bits=2)  # keeps 1.0 and 0.9; codes 0 0 2 K / K 0 1 0
    assert ms.support(ms.encode(x)).tolist() == [
        [False, False, True, True],
        [True, False, True, False],
    ]
    sp = get_codec("sp", ratio=0.75)
    assert torch.equal(sp.support(sp.encode(x)), sp.decode(sp.encode(x)) != 0)
    with pytest.raises(PayloadError, match="encoded by codec 'sp', not 'ms'"):
        ms.support(sp.encode(x))


def test_get_codec_refuses_a_registered_class_that_is_no_codec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(registry._BY_NAME, "fake", type("Fake", (), {}))
    with pytest.raises(TypeError, match="'fake' is registered, but Fake is no Codec"):
        get_codec("fake")


def test_compression_error() -> None:
    x = torch.tensor([3.0, 4.0])
    assert compression_error(x, x) == 0.0
    assert compression_error(x, torch.zeros(2)) == pytest.approx(1.0)
    assert compression_error(x, torch.tensor([3.0, 0.0])) == pytest.approx(0.8)
    assert compression_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert compression_error(torch.zeros(0), torch.zeros(0)) == 0.0
    assert math.isinf(compression_error(torch.zeros(2), torch.ones(2)))
    half = compression_error(x.half(), torch.tensor([3.0, 0.0]).bfloat16())
    assert half == pytest.approx(0.8)
    with pytest.raises(ValueError, match="shapes differ"):
        compression_error(torch.zeros(2), torch.zeros(3))
