"""Positions of the kept elements of a sparse tensor (``sp`` and ``rt``).

Two forms, whichever is smaller (paper App. B): a 1-bit-per-element bitmap of ``ceil(d/8)``
bytes, or the sorted positions as 32-bit little-endian indices (``4*k`` bytes). The bitmap wins
ties. A flag bit in the payload header records the form, and decoding checks it against the
rule, so each selection has exactly one byte form. Both directions run on the tensor's device.
"""

from __future__ import annotations

import numpy as np
import torch

from . import bitpack
from .dtypes import LITTLE_ENDIAN, bytes_to_device, to_host_bytes
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
    """Bytes and flag for sorted, distinct int64 positions ``idx`` in ``[0, d)`` (any device)."""
    k = idx.numel()
    if uses_indices(d, k):
        host = idx.to(torch.int32).cpu().numpy()  # positions < 2**31 (MAX_NUMEL)
        return np.asarray(host, dtype="<u4").tobytes(), INDEX_FLAG
    bitmap = torch.zeros(d, dtype=torch.uint8, device=idx.device)
    bitmap[idx] = 1
    return to_host_bytes(bitpack.pack(bitmap, 1)), 0


def decode_positions(
    buf: bytes, d: int, k: int, flags: int, device: torch.device | None = None
) -> torch.Tensor:
    """Sorted int64 positions on ``device`` (CPU by default).

    PayloadError unless they are k distinct positions in [0, d).
    """
    dev = torch.device("cpu") if device is None else device
    if bool(flags & INDEX_FLAG) != uses_indices(d, k):
        raise PayloadError("position form flag contradicts the bitmap-or-indices rule")
    if flags & INDEX_FLAG:
        if len(buf) != 4 * k:
            raise PayloadError(f"indices: expected {4 * k} bytes, got {len(buf)}")
        if LITTLE_ENDIAN:
            raw = bytes_to_device(buf, dev).view(torch.int32)
        else:
            raw = torch.from_numpy(np.frombuffer(buf, dtype="<u4").astype(np.int32)).to(dev)
        # uint32 values >= 2**31 read as negative int32: rejected as out of range below.
        idx = raw.to(torch.int64)
        bad = (idx[0] < 0) | (idx[-1] >= d) | (idx[1:] <= idx[:-1]).any() if k else None
        if bad is not None and bool(bad):
            raise PayloadError("indices out of range or not strictly increasing")
        return idx
    bits = bitpack.unpack(buf, 1, d, dev)
    idx = bits.nonzero().view(-1)
    if idx.numel() != k:
        raise PayloadError(f"bitmap marks {idx.numel()} positions, the payload holds {k} values")
    return idx
