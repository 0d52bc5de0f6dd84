"""Fuzzing the decoder: truncated and mutated payloads give PayloadError or a valid tensor."""

from __future__ import annotations

import contextlib
import random
import resource
import struct
import time
import tracemalloc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_splitms.codecs import Payload, PayloadError, codec_names, decode_bytes, get_codec


def corpus() -> list[bytes]:
    """Valid payloads of every codec, layout and dtype, kept small so fuzzing is fast."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.rand(16, generator=g),
        torch.randn(3, 5, generator=g),
        torch.relu(torch.randn(2, 3, 4, generator=g)).half(),
        torch.randn(4, 9, generator=g).bfloat16(),
        torch.randn(100, generator=g),
        torch.tensor(2.0),
        torch.zeros(2, 0, 3),
        torch.zeros(6),
    ]
    codecs = [
        get_codec("none"),
        get_codec("qu", bits=3),
        get_codec("qu", bits=11),
        get_codec("sp", ratio=0.75),
        get_codec("sp", ratio=0.99),
        get_codec("rt", ratio=0.5, alpha=0.3),
        get_codec("ms", ratio=0.75, bits=2),
        get_codec("ms", ratio=0.5, bits=8, rounding="floor"),
        get_codec("ms", ratio=0.6, bits=3, signed=True, scope="sample"),
    ]
    codecs += [get_codec(name) for name in codec_names() if name not in ("none", "qu", "sp", "rt")]
    return [c.encode(x, generator=g).to_bytes() for c in codecs for x in tensors]


CORPUS = corpus()


def check_outcome(blob: bytes) -> bool:
    """Decode; only PayloadError may escape, and a decoded tensor must match its header."""
    try:
        y = decode_bytes(blob)
    except PayloadError:
        return False
    p = Payload.from_bytes(blob)
    assert tuple(y.shape) == p.shape and y.dtype == p.dtype
    assert bool(torch.isfinite(y.float()).all())
    return True


def test_corpus_decodes() -> None:
    assert all(check_outcome(blob) for blob in CORPUS)


def test_every_truncation_is_rejected() -> None:
    for blob in CORPUS:
        for n in range(len(blob)):
            with pytest.raises(PayloadError):
                Payload.from_bytes(blob[:n])


def mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # overwrite a byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:  # insert bytes
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:  # delete a range
            del b[pos : pos + rng.randint(1, 8)]
        elif op == 4 and len(b) >= 12:  # extreme value in a header byte
            b[rng.randrange(12)] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF])
        elif op == 5 and len(b) >= 20:  # extreme 64-bit field after the fixed header
            off = rng.randrange(12, len(b) - 7)
            value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])
            b[off : off + 8] = struct.pack("<Q", value)
        elif op == 6:  # splice with another payload
            other = rng.choice(CORPUS)
            cut = rng.randrange(len(other) + 1)
            b = b[:pos] + other[cut:]
    return bytes(b)


MUTATIONS_PER_CODEC = 10_000
DECODE_CAP = 1 << 16  # elements: bigger declared shapes are parsed but not decoded here


def test_random_mutations_of_every_codec_at_scale() -> None:
    """10,000 mutated payloads per registered codec: only PayloadError may come out.

    Memory stays bounded: ``from_bytes`` allocates at most about the blob's length whatever
    the header declares (traced with tracemalloc), and the process's peak RSS does not grow by
    more than a few MiB over the whole run (decoding allocates what the header's shape allows,
    at most ``DECODE_CAP`` elements here).
    """
    rng = random.Random(20240813)
    by_codec: dict[str, list[bytes]] = {}
    for blob in CORPUS:
        by_codec.setdefault(Payload.from_bytes(blob).codec, []).append(blob)
    assert set(by_codec) == set(codec_names())
    start = time.perf_counter()
    blobs = [
        mutate(rng, rng.choice(by_codec[name]))
        for name in codec_names()
        for _ in range(MUTATIONS_PER_CODEC)
    ]
    parsed: list[Payload] = []
    tracemalloc.start()
    try:
        for blob in blobs:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            with contextlib.suppress(PayloadError):
                parsed.append(Payload.from_bytes(blob))
            peak = tracemalloc.get_traced_memory()[1] - base
            assert peak <= 2 * len(blob) + 16_384, (peak, len(blob))
    finally:
        tracemalloc.stop()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = dict.fromkeys(["decoded", "rejected", "too large to decode"], 0)
    for payload in parsed:
        if payload.numel > DECODE_CAP:
            outcomes["too large to decode"] += 1
            continue
        try:
            y = get_codec(payload.codec, **payload.params).decode(payload)
        except PayloadError:
            outcomes["rejected"] += 1
            continue
        assert tuple(y.shape) == payload.shape and y.dtype == payload.dtype
        outcomes["decoded"] += 1
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert rss_growth_mib < 64, rss_growth_mib
    assert outcomes["rejected"] > 0 and outcomes["decoded"] > 0, outcomes
    assert len(blobs) - len(parsed) > len(blobs) // 2  # most mutations break the header
    assert time.perf_counter() - start < 120  # about 10 s on one core


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=120), codec_id=st.integers(0, 5), ndim=st.integers(0, 3))
def test_arbitrary_bytes_after_a_plausible_prefix(tail: bytes, codec_id: int, ndim: int) -> None:
    check_outcome(b"FSMS\x01" + bytes([codec_id, 0, 0, ndim]) + tail)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes(blob: bytes) -> None:
    check_outcome(blob)


def test_data_section_mutations() -> None:
    """Same-length corruption of the data keeps the header valid: the content checks answer."""
    rng = random.Random(7)
    payloads = [Payload.from_bytes(b) for b in CORPUS]
    payloads = [p for p in payloads if p.nbytes > 0]
    outcomes = {"decoded": 0, "rejected": 0}
    for _ in range(3000):
        p = rng.choice(payloads)
        sections = [bytearray(s) for s in p.sections]
        candidates = [s for s in sections if s]
        for _ in range(rng.randint(1, 3)):
            s = rng.choice(candidates)
            i = rng.randrange(len(s))
            s[i] = s[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.7 else rng.randrange(256)
        blob = Payload(
            p.codec, p.params, p.shape, p.dtype, tuple(bytes(s) for s in sections), p.flags
        ).to_bytes()
        outcomes["decoded" if check_outcome(blob) else "rejected"] += 1
    assert outcomes["decoded"] > 0 and outcomes["rejected"] > 0
