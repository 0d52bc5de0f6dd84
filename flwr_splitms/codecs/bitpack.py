"""Packing of fixed-width unsigned codes into bytes (1 to 16 bits per code), in torch.

Code ``i`` occupies bits ``[i*w, (i+1)*w)`` of the stream, least significant bit first, bytes
in order (the layout of ``numpy.packbits(..., bitorder="little")``). ``n`` codes of ``w`` bits
take exactly ``ceil(n*w/8)`` bytes; the unused high bits of the last byte are zero, and
``unpack`` rejects streams where they are not (so every code stream has one byte form).

Everything runs on the codes' own device with a handful of whole-tensor operations (no
Python loop over elements, no host round trip). For widths up to 7, the 8 one-byte codes of a
group are read as one little-endian int64 and squeezed together in three shift-or-mask steps
(pairs, quads, the whole group), leaving the group's ``w`` packed bytes at its low end;
``unpack`` runs the three steps backwards. Widths 8 and 16 are plain byte copies; widths 9 to
15 (and big-endian hosts) expand codes to single bits.
"""

from __future__ import annotations

import torch

from .dtypes import LITTLE_ENDIAN
from .payload import PayloadError

__all__ = [
    "MAX_BITS",
    "code_dtype",
    "lane_codes",
    "load",
    "pack",
    "pack_float_codes",
    "packed_nbytes",
    "unpack",
]

MAX_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def code_dtype(bits: int) -> torch.dtype:
    """Dtype of unpacked codes: uint8 up to 8 bits, int32 above."""
    return torch.uint8 if bits <= 8 else torch.int32


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def _stages(bits: int) -> list[tuple[int, int, int, int]]:
    """(shift, low mask, high mask, unpacked high mask) of the three squeeze steps.

    Step k merges units of u = 8*2**k bits, each holding p = bits*2**k packed bits, in pairs:
    the low unit stays, the high one moves down by u - p to sit right above it.
    """
    out = []
    for k in range(3):
        u, p = 8 << k, bits << k
        lanes = range(0, 64, 2 * u)
        low = sum(((1 << p) - 1) << lane for lane in lanes)
        out.append((u - p, low, low << p, low << u))
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a tensor of unsigned codes below ``2**bits`` into ``ceil(n*bits/8)`` bytes.

    Returns a 1-D uint8 tensor on the codes' device.
    """
    _check_bits(bits)
    codes = codes.reshape(-1)
    n = codes.numel()
    nbytes = packed_nbytes(n, bits)
    dev = codes.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 16:
        wide = codes.to(torch.int32)
        return torch.stack([wide & 0xFF, wide >> 8], dim=1).to(torch.uint8).reshape(-1)
    if bits < 8 and LITTLE_ENDIAN:
        return _pack_squeeze(codes.to(torch.uint8), bits, nbytes)
    return _pack_bitwise(codes, bits, nbytes)


def _pack_squeeze(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    n = codes.numel()
    groups = -(-n // 8)
    if n == 8 * groups and codes.is_contiguous():
        w = codes.view(torch.int64)
    else:
        buf = torch.zeros(groups * 8, dtype=torch.uint8, device=codes.device)
        buf[:n] = codes
        w = buf.view(torch.int64)
    for shift, low, high, _ in _stages(bits):
        hi = w >> shift  # codes are below 2**7: words are non-negative, >> is logical
        hi &= high
        lo = w & low
        lo |= hi
        w = lo
    return w.view(torch.uint8).view(groups, 8)[:, :bits].reshape(-1)[:nbytes]


def _pack_bitwise(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    n = codes.numel()
    dev = codes.device
    shifts = torch.arange(bits, dtype=torch.int32, device=dev)
    stream = ((codes.to(torch.int32).unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=dev)
    padded[: n * bits] = stream
    weights = torch.arange(8, dtype=torch.uint8, device=dev)
    return (padded.view(nbytes, 8) << weights).sum(dim=1, dtype=torch.uint8)


def pack_float_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack`` for codes held as integral float32 values (what quantization produces).

    Widths 1, 2 and 4 combine the ``8 // bits`` codes of each byte with one small matrix
    product (exact: every partial sum is an integer below 256), skipping the float-to-integer
    conversion of the whole tensor; other widths convert and call ``pack``.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits in (1, 2, 4) and n:
        per = 8 // bits
        nbytes = packed_nbytes(n, bits)
        if n != nbytes * per:
            flat = torch.cat([flat, flat.new_zeros(nbytes * per - n)])
        weights = torch.tensor(
            [float(1 << (bits * j)) for j in range(per)], dtype=flat.dtype, device=flat.device
        )
        # via int32: float -> uint8 conversion has no fast kernel on the CPU (4x slower)
        return (flat.view(nbytes, per) @ weights).to(torch.int32).to(torch.uint8)
    return pack(flat.to(torch.int32), bits)


def load(
    buf: bytes | memoryview | torch.Tensor, bits: int, count: int, device: torch.device
) -> torch.Tensor:
    """The packed stream of ``count`` codes as a uint8 tensor on ``device``, checked.

    ``buf`` is host bytes (checked there, then uploaded once) or a uint8 tensor. Raises
    PayloadError if it is not exactly ``ceil(count*bits/8)`` bytes or its padding bits are
    not zero.
    """
    _check_bits(bits)
    nbytes = packed_nbytes(count, bits)
    if len(buf) != nbytes:
        raise PayloadError(f"packed codes: expected {nbytes} bytes, got {len(buf)}")
    if nbytes == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    rem = (count * bits) % 8
    if isinstance(buf, torch.Tensor):
        raw = buf.to(device=device, dtype=torch.uint8)
        last = int(raw[-1]) if rem else 0
    else:
        last = buf[-1] if rem else 0
        raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8).to(device)
    if rem and last >> rem:
        raise PayloadError("packed codes: padding bits of the last byte are not zero")
    return raw


def lane_codes(bits: int) -> torch.Tensor:
    """(256, 8 // bits) int32 table: the codes packed in each possible byte (bits 1, 2, 4, 8)."""
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (byte >> shifts) & ((1 << bits) - 1)


def unpack(
    buf: bytes | memoryview | torch.Tensor, bits: int, count: int, device: torch.device
) -> torch.Tensor:
    """Inverse of ``pack``: ``count`` codes (``code_dtype(bits)``) on ``device``.

    ``buf`` as for ``load``, which checks it (PayloadError for a wrong length or padding).
    """
    raw = load(buf, bits, count, device)
    if count == 0:
        return torch.zeros(0, dtype=code_dtype(bits), device=device)
    if bits == 8:
        return raw
    if bits == 16:
        pairs = raw.view(count, 2).to(torch.int32)
        return pairs[:, 0] | (pairs[:, 1] << 8)
    if bits < 8 and LITTLE_ENDIAN:
        return _unpack_squeeze(raw, bits, count)
    return _unpack_bitwise(raw, bits, count)


def _unpack_squeeze(raw: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    groups = -(-count // 8)
    grouped = torch.zeros(groups, 8, dtype=torch.uint8, device=raw.device)
    if raw.numel() == groups * bits:
        grouped[:, :bits] = raw.view(groups, bits)
    else:
        stream = torch.zeros(groups * bits, dtype=torch.uint8, device=raw.device)
        stream[: raw.numel()] = raw
        grouped[:, :bits] = stream.view(groups, bits)
    w = grouped.view(torch.int64).reshape(-1)
    for shift, low, _, spread in reversed(_stages(bits)):
        hi = w << shift  # at most 8*bits + 24 < 63 bits: never reaches the sign bit
        hi &= spread
        w &= low
        w |= hi
    return w.view(torch.uint8)[:count]


def _unpack_bitwise(raw: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    dev = raw.device
    weights = torch.arange(8, dtype=torch.uint8, device=dev)
    stream = ((raw.unsqueeze(1) >> weights) & 1).reshape(-1)[: count * bits]
    shifts = torch.arange(bits, dtype=torch.int32, device=dev)
    return (stream.view(count, bits).to(torch.int32) << shifts).sum(dim=1, dtype=torch.int32)
