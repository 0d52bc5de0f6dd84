"""Downlink (gradient) codecs: half precision, mask reuse, registered codecs, and their wire."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from flwr_splitms.codecs import Payload, PayloadError, compression_error, decode_bytes, get_codec
from flwr_splitms.codecs.downlink import (
    GradCodec,
    MaskGradCodec,
    get_grad_codec,
    grad_codec_names,
    support_of,
)

# -- fp16 / bf16 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "wire"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_round_trip_and_bytes(name: str, wire: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    codec = get_codec(name)
    for x in (
        torch.randn(3, 4, 5, generator=g),
        torch.randn(7, generator=g).half(),
        torch.zeros(0),
    ):
        p = codec.encode(x)
        assert p.nbytes == 2 * x.numel()
        assert p.header_nbytes == 20 + 8 * x.dim()
        y = decode_bytes(p.to_bytes())
        assert y.dtype == x.dtype and y.shape == x.shape
        assert torch.equal(y, x.to(wire).to(x.dtype))  # round to nearest, back to the input dtype
        payload, err = codec.encode_measured(x)
        assert payload.sections == p.sections
        assert err == pytest.approx(compression_error(x, y), abs=1e-12)
    same = torch.randn(10, generator=g).to(wire)
    assert torch.equal(codec.decode(codec.encode(same)), same)  # lossless in its own format
    with pytest.raises(ValueError, match="unknown parameter"):
        get_codec(name, bits=3)


def test_fp16_overflow_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"overflows torch.float16.*use 'bf16'"):
        get_codec("fp16").encode(torch.tensor([1.0, 7e4]))
    assert torch.equal(
        get_codec("bf16").decode(get_codec("bf16").encode(torch.tensor([7e4]))),
        torch.tensor([7e4]).bfloat16().float(),
    )


def test_half_precision_payload_rejects_wrong_lengths() -> None:
    blob = get_codec("bf16").encode(torch.randn(4, 4)).to_bytes()
    with pytest.raises(PayloadError):
        Payload.from_bytes(blob[:-2])
    inf = Payload("fp16", {}, (1,), torch.float32, (b"\x00\x7c",))  # +Inf as float16
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_bytes(inf.to_bytes())


# -- names and registered codecs on the gradient ----------------------------------------------


def test_names_and_construction_errors() -> None:
    names = grad_codec_names()
    assert {"none", "fp16", "bf16", "mask", "qu", "sp", "rt", "ms"} <= set(names)
    for name in names:
        c = get_grad_codec(name)
        assert isinstance(c, GradCodec) and c.name == name
        assert c.needs_support == (name == "mask")
        assert get_grad_codec(c.name, **c.params) == c
        assert eval(repr(c), {"get_grad_codec": get_grad_codec}) == c
    with pytest.raises(ValueError, match=r"unknown grad codec .zip.*mask"):
        get_grad_codec("zip")
    with pytest.raises(ValueError, match="unknown parameter 'ratio' for grad codec 'mask'"):
        get_grad_codec("mask", ratio=0.9)
    with pytest.raises(ValueError, match="values must be one of"):
        get_grad_codec("mask", values="fp8")
    with pytest.raises(ValueError, match="bits must be in"):
        get_grad_codec("ms", bits=0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("none", {}),
        ("fp16", {}),
        ("bf16", {}),
        ("qu", {"bits": 8}),
        ("sp", {"ratio": 0.9}),
        ("rt", {"ratio": 0.9}),
        ("ms", {"ratio": 0.9, "bits": 4}),
    ],
)
def test_registered_codecs_on_the_gradient(name: str, params: dict[str, object]) -> None:
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(4, 3, 6, 6, generator=gen) * 1e-3  # signed, small: a gradient
    gc = get_grad_codec(name, **params)
    blob = gc.encode(grad, generator=gen)
    assert isinstance(blob, bytes)
    p = Payload.from_bytes(blob)
    assert len(blob) == p.nbytes + p.header_nbytes
    out = gc.decode(blob, shape=grad.shape)
    assert out.shape == grad.shape and out.dtype == grad.dtype
    direct = get_codec(name, **params).decode(p)
    assert torch.equal(out, direct)
    if name == "none":
        assert torch.equal(out, grad) and len(blob) == 4 * grad.numel() + 52
    with pytest.raises(PayloadError, match="does not match the expected shape"):
        gc.decode(blob, shape=(4, 3, 6, 5))
    other = get_grad_codec("sp" if name != "sp" else "qu").encode(grad)
    with pytest.raises(PayloadError, match="encoded by codec"):
        gc.decode(other)


# -- support_of: the same mask on both ends ---------------------------------------------------


def ms_cases() -> list[tuple[torch.Tensor, dict[str, object]]]:
    g = torch.Generator().manual_seed(2)
    relu = torch.relu(torch.randn(4, 8, 6, 6, generator=g))
    signed = torch.randn(4, 8, 6, 6, generator=g)
    return [
        (relu, {"ratio": 0.99, "bits": 2}),
        (relu, {"ratio": 0.9, "bits": 3, "rounding": "floor"}),
        (relu, {"ratio": 0.95, "bits": 2, "scope": "sample"}),
        (relu, {"ratio": 0.99, "bits": 2, "entropy": "zstd"}),
        (signed, {"ratio": 0.9, "bits": 2}),  # sign bit in use
        (signed, {"ratio": 0.8, "bits": 1, "scope": "sample", "entropy": "zstd"}),
        (relu.half(), {"ratio": 0.5, "bits": 8, "signed": True}),
        (torch.zeros(3, 5), {"ratio": 0.5, "bits": 2}),
    ]


@pytest.mark.parametrize("case", range(len(ms_cases())))
def test_support_is_identical_on_client_and_server(case: int) -> None:
    x, params = ms_cases()[case]
    sent = get_codec("ms", **params).encode(x)  # the client's payload
    received = Payload.from_bytes(sent.to_bytes())  # what the server gets
    s_client, s_server = support_of(sent), support_of(received)
    assert s_client.dtype == torch.bool and s_client.shape == x.shape
    assert torch.equal(s_client, s_server)
    # Independent definition: code != 0 <=> decoded value != 0, once kept values are nonzero.
    decoded = decode_bytes(sent.to_bytes())
    if x.count_nonzero() > 0:
        assert torch.equal(s_client, decoded != 0)
    else:  # all zero: only the k kept positions (code 2^b - 1) are in the support
        assert int(s_client.sum()) == 7  # k = floor(0.5 * 15)
    # kept positions are always in the support
    assert int(s_client.sum()) >= int((decoded != 0).sum())


def test_support_of_figure_one_example() -> None:
    """Paper Fig. 1 style: top-2 of 8, 2-bit codes; support = kept + nonzero codes."""
    x = torch.tensor([0.0, 0.05, 0.5, 1.0, 0.9, 0.0, 0.2, 0.1])
    p = get_codec("ms", ratio=0.75, bits=2).encode(x)  # keeps 1.0 and 0.9, Top_min 0.9
    # codes: round(|x| * 3 / 0.9) -> 0, 0, 2, K, K, 0, 1, 0
    assert support_of(p).tolist() == [False, False, True, True, True, False, True, False]


def test_support_of_other_codecs_is_the_nonzero_decoded_tensor() -> None:
    x = torch.relu(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)))
    for name, params in [("none", {}), ("sp", {"ratio": 0.9}), ("qu", {"bits": 2}), ("fp16", {})]:
        p = get_codec(name, **params).encode(x)
        s = support_of(Payload.from_bytes(p.to_bytes()))
        assert torch.equal(s, support_of(p))
        assert torch.equal(s, decode_bytes(p.to_bytes()) != 0)
    assert torch.equal(support_of(get_codec("none").encode(x)), x != 0)
    with pytest.raises(TypeError):
        support_of(x)  # type: ignore[arg-type]


# -- mask reuse ---------------------------------------------------------------------------------


def test_mask_round_trip_and_bytes() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(4, 8, 6, 6, generator=gen))
    grad = torch.randn(4, 8, 6, 6, generator=gen)
    payload = get_codec("ms", ratio=0.9, bits=2).encode(x)
    support = support_of(payload)
    k = int(support.sum())
    assert 0 < k < x.numel()
    for values, size in [("none", 4), ("fp16", 2), ("bf16", 2)]:
        mc = get_grad_codec("mask", values=values)
        blob = mc.encode(grad, support=support)
        assert len(blob) == 28 + size * k  # header of a 1-d payload + the support values
        server_side = support_of(Payload.from_bytes(payload.to_bytes()))
        out = mc.decode(blob, support=server_side, shape=x.shape)
        assert out.dtype == grad.dtype and out.shape == grad.shape
        expected = torch.where(support, grad, torch.zeros(()))
        wire = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[values]
        assert torch.equal(out, expected.to(wire).to(torch.float32))
    half = get_grad_codec("mask").encode(grad.half(), support=support)
    assert len(half) == 28 + 2 * k  # values travel in the gradient's dtype


def test_mask_refuses_misuse_and_mismatched_supports() -> None:
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(2, 3, 4, generator=gen)
    support = torch.rand(2, 3, 4, generator=gen) > 0.5
    mc = get_grad_codec("mask")
    assert isinstance(mc, MaskGradCodec)
    with pytest.raises(ValueError, match=r"needs support=.*support_of"):
        mc.encode(grad)
    with pytest.raises(ValueError, match="bool tensor"):
        mc.encode(grad, support=support.float())
    with pytest.raises(ValueError, match="does not match the support"):
        mc.encode(grad, support=support[:1])
    blob = mc.encode(grad, support=support)
    other = support.clone()
    other.view(-1)[torch.nonzero(~support.view(-1))[0]] = True  # one more position
    with pytest.raises(PayloadError, match=r"support has .* positions"):
        mc.decode(blob, support=other)
    with pytest.raises(PayloadError, match="expected shape"):
        mc.decode(blob, support=support, shape=(2, 3, 5))
    with pytest.raises(PayloadError, match="encoded by codec 'none', not 'fp16'"):
        get_grad_codec("mask", values="fp16").decode(blob, support=support)
    with pytest.raises(PayloadError):
        mc.decode(b"FSMS" + bytes(20), support=support)


def test_fuzz_mask_blobs_only_raise_payload_error() -> None:
    rng = random.Random(6)
    gen = torch.Generator().manual_seed(6)
    support = torch.rand(3, 4, 5, generator=gen) > 0.6
    grad = torch.randn(3, 4, 5, generator=gen)
    codecs = [get_grad_codec("mask", values=v) for v in ("none", "fp16", "bf16")]
    blobs = [(c, c.encode(grad, support=support)) for c in codecs]
    k = int(support.sum())
    accepted = 0
    for _ in range(1500):
        codec, blob = rng.choice(blobs)
        b = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            if not b:
                break
            op = rng.randrange(3)
            if op == 0:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op == 1:
                b[rng.randrange(len(b))] = rng.randrange(256)
            else:
                del b[rng.randrange(len(b)) :]
        try:
            out = codec.decode(bytes(b), support=support)
        except PayloadError:
            continue
        accepted += 1
        assert out.shape == support.shape and bool(torch.isfinite(out.float()).all())
        assert int(out[~support].count_nonzero()) == 0 and k == int(support.sum())
    assert accepted < 1500


# -- the claim of the docstring: exact where the ReLU output is 0 -----------------------------


def client_server(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    server = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return client, server


def client_grads(client: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    client.zero_grad(set_to_none=True)
    client(x).backward(grad)
    return torch.cat([p.grad.reshape(-1) for p in client.parameters()])  # type: ignore[union-attr]


def mask_reuse_gradients(
    ratio: float, bits: int, seed: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full, exact-zero-dropped, mask-reused) client parameter gradients of one split step."""
    client, server = client_server(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 10, 10, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    with torch.no_grad():
        act = client(x)
    payload = get_codec("ms", ratio=ratio, bits=bits).encode(act)
    a_hat = decode_bytes(payload.to_bytes()).requires_grad_(True)
    nn.functional.cross_entropy(server(a_hat), y).backward()
    grad = a_hat.grad
    assert grad is not None and int((grad[act == 0] != 0).sum()) > 0  # nonzero where a = 0
    full = client_grads(client, x, grad)
    relu_zero = client_grads(client, x, torch.where(act != 0, grad, torch.zeros(())))
    mc = get_grad_codec("mask")
    server_support = support_of(Payload.from_bytes(payload.to_bytes()))
    sent = mc.decode(mc.encode(grad, support=server_support), support=support_of(payload))
    return full, relu_zero, client_grads(client, x, sent)


def test_mask_reuse_is_exact_where_relu_output_is_zero() -> None:
    rel = {}
    for bits in (2, 8):
        full, relu_zero, masked = mask_reuse_gradients(ratio=0.99, bits=bits)
        # Dropping the gradient where the ReLU output is 0 changes no parameter gradient, bit
        # for bit.
        assert torch.equal(full, relu_zero)
        # MS code 0 also covers small positive activations: that part is an approximation.
        rel[bits] = float(torch.linalg.vector_norm(masked - full) / torch.linalg.vector_norm(full))
        assert 0.0 < rel[bits] < 1.0
    # With more bits fewer positive activations get code 0: the approximation tightens.
    assert rel[8] < rel[2]
