"""The lossless entropy stage (``ms`` parameter ``entropy``): bit-identical, smaller, bounded."""

from __future__ import annotations

import random
import struct

import pytest
import torch
import zstandard

from flwr_splitms.codecs import Payload, PayloadError, decode_bytes, get_codec
from flwr_splitms.codecs.entropy import declared_lengths, decode_sections, encode_sections


def relu_batch(seed: int = 0, shape: tuple[int, ...] = (4, 8, 16, 16)) -> torch.Tensor:
    """ReLU of a smooth random field: zeros come in spatial runs, like conv activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # spatial correlation
    return torch.relu(x - 0.1)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is bit for bit (-0.0 != 0.0)."""
    return t.reshape(-1).view(torch.int32 if t.element_size() == 4 else torch.int16)


CASES = [
    {"ratio": 0.99, "bits": 2},
    {"ratio": 0.9, "bits": 3, "rounding": "floor"},
    {"ratio": 0.75, "bits": 1},
    {"ratio": 0.5, "bits": 8, "signed": True, "scope": "sample"},
    {"ratio": 0.9, "bits": 4, "scope": "sample"},
]
TENSORS = [
    relu_batch(),
    torch.randn(3, 5, 7),  # signed: sign bit in use
    relu_batch(1).half(),
    relu_batch(2).bfloat16(),
    torch.zeros(2, 3, 4),
    torch.tensor(2.5),
    torch.zeros(2, 0, 3),
]


@pytest.mark.parametrize("params", CASES)
def test_zstd_decodes_bit_identical_to_none(params: dict[str, object]) -> None:
    plain, coded = get_codec("ms", **params), get_codec("ms", entropy="zstd", **params)
    for x in TENSORS:
        p0, p1 = plain.encode(x), coded.encode(x)
        # The stage codes exactly the sections the codec wrote: entropy="none" bytes unchanged.
        assert decode_sections(p1.params, p1.sections) == p0.sections
        assert declared_lengths(p1.params, p1.sections) == tuple(len(s) for s in p0.sections)
        y0, y1 = plain.decode(p0), decode_bytes(p1.to_bytes())
        assert y1.dtype == x.dtype and y1.shape == x.shape
        assert torch.equal(as_bits(y0), as_bits(y1))
        assert len(p1.to_bytes()) == p1.nbytes + p1.header_nbytes


def test_none_sections_are_the_codec_sections() -> None:
    """entropy="none" (the default) leaves the data sections exactly as the codec wrote them."""
    x = relu_batch()
    p = get_codec("ms").encode(x)
    assert p.params["entropy"] == "none"
    assert encode_sections(p.params, p.sections) == p.sections
    assert get_codec("ms", entropy="none") == get_codec("ms")
    k = int(0.01 * x.numel())
    assert p.nbytes == x.numel() * 2 // 8 + 4 * k  # Fig. 1 formula: ceil(d*b/8) + 4k


def test_zstd_saves_bytes_on_relu_activations() -> None:
    x = relu_batch(shape=(8, 16, 32, 32))
    p0 = get_codec("ms").encode(x)
    p1 = get_codec("ms", entropy="zstd").encode(x)
    saving = p0.nbytes / p1.nbytes
    assert saving > 1.15, saving  # mask codes are mostly 0 and come in runs
    assert p1.to_bytes()[:4] == b"FSMS"


def test_bad_entropy_value_is_refused() -> None:
    with pytest.raises(ValueError, match="entropy must be one of 'none', 'zstd'"):
        get_codec("ms", entropy="gzip")
    with pytest.raises(ValueError, match="unknown parameter 'entropy'"):
        get_codec("sp", entropy="zstd")


def with_sections(p: Payload, sections: list[bytes]) -> bytes:
    """The payload's header with other data sections (lengths updated)."""
    return Payload(p.codec, p.params, p.shape, p.dtype, tuple(sections), p.flags).to_bytes()


def frame_with_size(data: bytes, declared: int) -> bytes:
    """A zstd frame of ``data`` whose header claims ``declared`` decoded bytes instead.

    RFC 8878 3.1.1.1: Frame_Content_Size is the last field of the frame header, 1, 2, 4 or 8
    bytes wide (the 2-byte form stores the size minus 256).
    """
    frame = zstandard.ZstdCompressor(level=1).compress(data)
    header = zstandard.frame_header_size(frame)
    fhd = frame[4]
    width = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width]
    field = struct.pack(fmt, declared - 256 if width == 2 else declared)
    return frame[: header - width] + field + frame[header:]


def test_zip_bomb_and_malformed_frames_give_payload_error() -> None:
    x = relu_batch(shape=(2, 4, 8, 8))
    codec = get_codec("ms", entropy="zstd")
    p = codec.encode(x)
    mask_len = len(decode_sections(p.params, p.sections)[0])
    values = p.sections[1]
    zstd = zstandard.ZstdCompressor(level=1)

    # A frame that declares the expected length but inflates far beyond it.
    big = bytes(2**23)  # 8 MiB of zeros: a few hundred bytes compressed
    bomb = frame_with_size(big, mask_len)
    assert zstandard.frame_content_size(bomb) == mask_len
    with pytest.raises(PayloadError, match="section 0"):
        decode_bytes(with_sections(p, [bomb, values]))
    # The same frame declaring its true size is refused by the layout check, before inflating.
    with pytest.raises(PayloadError, match="inconsistent section lengths"):
        Payload.from_bytes(with_sections(p, [zstd.compress(big), values]))
    bad = {
        "no size": zstandard.ZstdCompressor(write_content_size=False).compress(bytes(mask_len)),
        "trailing": zstd.compress(bytes(mask_len)) + b"\0",
        "two frames": zstd.compress(bytes(mask_len // 2)) + zstd.compress(bytes(mask_len // 2)),
        "raw mask": bytes(mask_len),
        "skippable": struct.pack("<II", 0x184D2A50, 4) + b"abcd",
        "truncated": zstd.compress(bytes(range(256)) * 4)[:-3],
        "empty": b"",
    }
    for what, section in bad.items():
        with pytest.raises(PayloadError):
            decode_bytes(with_sections(p, [section, values]))
        with pytest.raises(PayloadError):
            codec.decode(Payload(p.codec, p.params, p.shape, p.dtype, (section, values), p.flags))
        assert what


def mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
    return bytes(b)


def test_fuzz_coded_payloads_only_raise_payload_error() -> None:
    """Mutations (header, frame headers, compressed blocks) decode or raise PayloadError."""
    rng = random.Random(0)
    payloads = [
        get_codec("ms", entropy="zstd", **params).encode(x)
        for params in CASES[:3]
        for x in (relu_batch(shape=(2, 3, 8, 8)), torch.randn(5, 7), torch.zeros(3))
    ]
    decoded = inflate_errors = 0
    for _ in range(1500):
        p = rng.choice(payloads)
        if rng.random() < 0.7:  # mutate one frame, keep the header consistent with it
            sections = list(p.sections)
            i = rng.randrange(len(sections))
            sections[i] = mutate(rng, sections[i])
            mutated = with_sections(p, sections)
        else:
            mutated = mutate(rng, p.to_bytes())
        try:
            y = decode_bytes(mutated)
        except PayloadError as e:
            inflate_errors += "entropy-coded section" in str(e)
            continue
        q = Payload.from_bytes(mutated)
        assert tuple(y.shape) == q.shape and y.dtype == q.dtype
        assert y.numel() <= 2 * 3 * 8 * 8  # never inflates beyond what the corpus holds
        decoded += 1
    assert decoded < 1500 and inflate_errors > 200  # the frame decoder was exercised
