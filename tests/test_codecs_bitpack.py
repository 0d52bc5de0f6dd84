"""Bit packing and the exact top-k selection underneath the codecs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr_splitms.codecs import PayloadError, bitpack
from flwr_splitms.codecs.positions import decode_positions, encode_positions, uses_indices
from flwr_splitms.codecs.selection import _narrowed_topk, top_indices


def reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """Bit by bit: code i at bits [i*bits, (i+1)*bits), least significant bit first."""
    stream = [(int(c) >> j) & 1 for c in codes for j in range(bits)]
    return np.packbits(np.array(stream, dtype=np.uint8), bitorder="little").tobytes()


CPU = torch.device("cpu")


def as_codes(arr: np.ndarray, bits: int) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.int64)).to(bitpack.code_dtype(bits))


def packed_bytes(codes: torch.Tensor, bits: int) -> bytes:
    return bitpack.pack(codes, bits).numpy().tobytes()


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_matches_reference_and_round_trips(bits: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, n)
    packed = packed_bytes(as_codes(codes, bits), bits)
    assert len(packed) == bitpack.packed_nbytes(n, bits) == -(-n * bits // 8)
    assert packed == reference_pack(codes, bits)
    out = bitpack.unpack(packed, bits, n, CPU)
    assert out.dtype == bitpack.code_dtype(bits) and out.shape == (n,)
    assert out.tolist() == codes.tolist()
    if bits <= 4:  # the float-code path used by the quantizers
        floats = torch.from_numpy(codes.astype(np.float32))
        assert bitpack.pack_float_codes(floats, bits).numpy().tobytes() == packed


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16])
def test_extreme_codes_and_large_arrays(bits: int) -> None:
    n = 100_003
    top = (1 << bits) - 1
    codes = np.full(n, top, dtype=np.int64)
    codes[::3] = 0
    packed = packed_bytes(as_codes(codes, bits), bits)
    assert packed == reference_pack(codes, bits)
    assert torch.equal(bitpack.unpack(packed, bits, n, CPU), as_codes(codes, bits))
    # a uint8 tensor as input works too, and a non-contiguous code tensor
    raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    assert torch.equal(bitpack.unpack(raw, bits, n, CPU), as_codes(codes, bits))
    strided = as_codes(np.repeat(codes, 2), bits)[::2]
    assert packed_bytes(strided, bits) == packed


def test_unpack_rejects_wrong_lengths_and_padding() -> None:
    with pytest.raises(PayloadError, match="expected 2 bytes"):
        bitpack.unpack(b"\x00", 3, 5, CPU)
    with pytest.raises(PayloadError, match="expected 1 bytes"):
        bitpack.unpack(b"\x00\x00", 2, 3, CPU)
    with pytest.raises(PayloadError, match="padding"):
        bitpack.unpack(b"\x40", 2, 3, CPU)  # 6 bits used, bit 6 set
    with pytest.raises(PayloadError, match="padding"):
        bitpack.unpack(torch.tensor([0x40], dtype=torch.uint8), 2, 3, CPU)
    assert bitpack.unpack(b"\x3f", 2, 3, CPU).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.16"):
        bitpack.pack(torch.zeros(3, dtype=torch.uint8), 17)


def test_position_form_rule() -> None:
    assert not uses_indices(16, 4)  # 2-byte bitmap beats 16 index bytes
    assert uses_indices(10_000, 100)  # 400 index bytes beat 1250 bitmap bytes
    assert not uses_indices(10_000, 312 + 1)  # 1252 > 1250
    idx = torch.tensor([1, 5, 9])
    data, flag = encode_positions(idx, 12)
    assert flag == 0 and data == bytes([0b00100010, 0b00000010])
    data, flag = encode_positions(idx, 1000)
    assert flag == 1 and data == np.array([1, 5, 9], dtype="<u4").tobytes()
    assert decode_positions(data, 1000, 3, flag).tolist() == [1, 5, 9]
    with pytest.raises(PayloadError, match="out of range"):
        decode_positions(np.array([1, 5, 2**31], dtype="<u4").tobytes(), 1000, 3, flag)


def check_top(mag: torch.Tensor, k: int) -> None:
    idx = top_indices(mag, k)
    assert idx.shape == (mag.shape[0], k) and idx.dtype == torch.int64
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending, distinct
    expected = torch.topk(mag, k, dim=1).values.sort(dim=1).values
    assert torch.equal(mag.gather(1, idx).sort(dim=1).values, expected)
    # canonical ties: below the k-th value nothing, at it the lowest positions
    kth = expected[:, :1]
    for r in range(mag.shape[0]):
        tied = (mag[r] == kth[r]).nonzero().view(-1)
        chosen = idx[r][mag[r, idx[r]] == kth[r]]
        assert torch.equal(chosen, tied[: chosen.numel()])


@pytest.mark.parametrize("kind", ["relu", "uniform", "ties", "zeros", "sorted", "spiky"])
@pytest.mark.parametrize("k", [1, 37, 2_621])
def test_top_indices_long_rows(kind: str, k: int) -> None:
    """Rows long enough for the sampled-threshold path, including its fallbacks."""
    g = torch.Generator().manual_seed(k)
    m = 1 << 18
    if kind == "relu":
        row = torch.relu(torch.randn(m, generator=g))
    elif kind == "uniform":
        row = torch.rand(m, generator=g)
    elif kind == "ties":
        row = torch.randint(0, 3, (m,), generator=g).float()
    elif kind == "zeros":
        row = torch.zeros(m)
    elif kind == "sorted":
        row = torch.arange(m, dtype=torch.float32)
    else:  # large values only where the strided sample never looks
        row = torch.rand(m, generator=g)
        row[1::4] += 10.0
    check_top(row.unsqueeze(0), k)


def test_narrowed_path_is_taken_on_activations() -> None:
    row = torch.relu(torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)))
    idx = _narrowed_topk(row, 10_485)
    assert idx is not None and idx.numel() == 10_485
    assert torch.equal(row[idx].sort().values, torch.topk(row, 10_485).values.sort().values)


def test_top_indices_short_and_multi_row() -> None:
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(5, 300, generator=g)
    for k in (0, 1, 7, 299, 300):
        if k:
            check_top(mag, k)
        assert top_indices(mag, k).shape == (5, k)
    assert torch.equal(top_indices(mag, 300)[0], torch.arange(300))
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_indices(ties, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
