"""Positions of the kept elements of a sparse tensor (``sp`` and ``rt``).

Two forms, whichever is smaller (paper App. B): a 1-bit-per-element bitmap of ``ceil(d/8)``
bytes, or the sorted positions as 32-bit little-endian indices (``4*k`` bytes). The bitmap wins
ties. A flag bit in the payload header records the form, and decoding checks it against the
rule, so each selection has exactly one byte form.
"""

from __future__ import annotations

import numpy as np
import torch

from . import bitpack
from .payload import PayloadError

__all__ = ["INDEX_FLAG", "decode_positions", "encode_positions", "positions_nbytes", "uses_indices"]

INDEX_FLAG = 0x01


def uses_indices(d: int, k: int) -> bool:
    """True when 32-bit indices are smaller than a bitmap."""
    return 4 * k < bitpack.packed_nbytes(d, 1)


def positions_nbytes(d: int, k: int) -> int:
    """``min(ceil(d/8), 4*k)``."""
    return min(bitpack.packed_nbytes(d, 1), 4 * k)


def encode_positions(idx: torch.Tensor, d: int) -> tuple[bytes, int]:
    """Bytes and flag for sorted, distinct int64 positions ``idx`` in ``[0, d)``."""
    k = idx.numel()
    if uses_indices(d, k):
        return np.asarray(idx.numpy(), dtype="<u4").tobytes(), INDEX_FLAG
    bitmap = np.zeros(d, dtype=np.uint8)
    bitmap[idx.numpy()] = 1
    return bitpack.pack(bitmap, 1), 0


def decode_positions(buf: bytes, d: int, k: int, flags: int) -> torch.Tensor:
    """Sorted int64 positions; PayloadError unless they are k distinct positions in [0, d)."""
    if bool(flags & INDEX_FLAG) != uses_indices(d, k):
        raise PayloadError("position form flag contradicts the bitmap-or-indices rule")
    if flags & INDEX_FLAG:
        if len(buf) != 4 * k:
            raise PayloadError(f"indices: expected {4 * k} bytes, got {len(buf)}")
        idx = np.frombuffer(buf, dtype="<u4").astype(np.int64)
        if k and (idx[-1] >= d or np.any(idx[1:] <= idx[:-1])):
            raise PayloadError("indices out of range or not strictly increasing")
        return torch.from_numpy(idx)
    bits = bitpack.unpack(buf, 1, d)
    idx = np.flatnonzero(bits)
    if idx.size != k:
        raise PayloadError(f"bitmap marks {idx.size} positions, the payload holds {k} values")
    return torch.from_numpy(idx.astype(np.int64, copy=False))
