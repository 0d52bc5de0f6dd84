"""Vectorized packing of fixed-width unsigned codes into bytes (1 to 16 bits per code).

Code ``i`` occupies bits ``[i*w, (i+1)*w)`` of the stream, least significant bit first, bytes
in order (the layout of ``numpy.packbits(..., bitorder="little")``). ``n`` codes of ``w`` bits
take exactly ``ceil(n*w/8)`` bytes; the unused high bits of the last byte are zero, and
``unpack`` rejects streams where they are not (so every code stream has one byte form).
Widths 1, 2, 4, 8 and 16 take byte-level fast paths; other widths assemble each group of 8
codes (``bits`` bytes) in one or two uint64 words with shifts, vectorized over the groups.
"""

from __future__ import annotations

import numpy as np

from .payload import PayloadError

__all__ = ["pack", "packed_nbytes", "unpack"]

MAX_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count*bits/8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack a 1-D array of unsigned codes below ``2**bits`` into ``ceil(n*bits/8)`` bytes."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes).reshape(-1)
    n = codes.size
    nbytes = packed_nbytes(n, bits)
    if n == 0:
        return b""
    if bits == 8:
        return codes.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return codes.astype("<u2", copy=False).tobytes()
    if bits == 1:
        return np.packbits(codes.astype(np.uint8, copy=False), bitorder="little").tobytes()
    if bits in (2, 4):
        per = 8 // bits
        padded = np.zeros(nbytes * per, dtype=np.uint8)
        padded[:n] = codes
        lanes = padded.reshape(nbytes, per)
        out = lanes[:, 0].copy()
        for j in range(1, per):  # loop over the few lanes of a byte, not over elements
            out |= lanes[:, j] << np.uint8(j * bits)
        return out.tobytes()
    return _pack_words(codes, bits, nbytes)


def _word_layout(bits: int) -> tuple[type[np.unsignedinteger], int, int]:
    """(word dtype, bits per word, words per group of 8 codes) for the word path."""
    if 8 * bits <= 32:
        return np.uint32, 32, 1
    return np.uint64, 64, -(-8 * bits // 64)


def _pack_words(codes: np.ndarray, bits: int, nbytes: int) -> bytes:
    """Any width: 8 codes fill ``bits`` bytes, assembled in one or two machine words."""
    n = codes.size
    groups = -(-n // 8)
    wtype, wbits, nwords = _word_layout(bits)
    padded = np.zeros(groups * 8, dtype=codes.dtype)
    padded[:n] = codes
    lanes = np.ascontiguousarray(padded.reshape(groups, 8).T)  # lanes[j] = j-th code of groups
    words = np.zeros((nwords, groups), dtype=wtype)
    for j in range(8):  # loop over the 8 codes of a group, vectorized over all groups
        lane = lanes[j].astype(wtype)
        wi, sh = divmod(j * bits, wbits)
        words[wi] |= lane << wtype(sh)
        if sh + bits > wbits:
            words[wi + 1] |= lane >> wtype(wbits - sh)
    as_bytes = np.ascontiguousarray(words.T).astype(f"<u{wbits // 8}", copy=False).view(np.uint8)
    return as_bytes.reshape(groups, -1)[:, :bits].tobytes()[:nbytes]


def unpack(buf: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: ``count`` codes (uint8 for bits <= 8, else uint16).

    Raises PayloadError if ``buf`` is not exactly ``ceil(count*bits/8)`` bytes or its padding
    bits are not zero.
    """
    _check_bits(bits)
    nbytes = packed_nbytes(count, bits)
    if len(buf) != nbytes:
        raise PayloadError(f"packed codes: expected {nbytes} bytes, got {len(buf)}")
    out_dtype = np.uint8 if bits <= 8 else np.uint16
    if count == 0:
        return np.zeros(0, dtype=out_dtype)
    raw = np.frombuffer(buf, dtype=np.uint8)
    rem = (count * bits) % 8
    if rem and raw[-1] >> rem:
        raise PayloadError("packed codes: padding bits of the last byte are not zero")
    if bits == 8:
        return raw.copy()
    if bits == 16:
        return np.frombuffer(buf, dtype="<u2").astype(np.uint16)
    if bits == 1:
        return np.unpackbits(raw, count=count, bitorder="little")
    if bits in (2, 4):
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        lanes = np.empty((nbytes, per), dtype=np.uint8)
        for j in range(per):
            lanes[:, j] = (raw >> np.uint8(j * bits)) & mask
        return lanes.reshape(-1)[:count]
    return _unpack_words(raw, bits, count)


def _unpack_words(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``_pack_words``."""
    groups = -(-count // 8)
    wtype, wbits, nwords = _word_layout(bits)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[: raw.size] = raw
    grouped = np.zeros((groups, nwords * wbits // 8), dtype=np.uint8)
    grouped[:, :bits] = stream.reshape(groups, bits)
    words = np.ascontiguousarray(grouped.view(f"<u{wbits // 8}").astype(wtype, copy=False).T)
    mask = wtype((1 << bits) - 1)
    out_dtype = np.uint8 if bits <= 8 else np.uint16
    lanes = np.empty((8, groups), dtype=out_dtype)
    for j in range(8):
        wi, sh = divmod(j * bits, wbits)
        lane = words[wi] >> wtype(sh)
        if sh + bits > wbits:
            lane |= words[wi + 1] << wtype(wbits - sh)
        lanes[j] = lane & mask
    return np.ascontiguousarray(lanes.T).reshape(-1)[:count]
