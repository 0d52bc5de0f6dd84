"""A lossless entropy stage for the data sections of a payload (codec parameter ``entropy``).

MS's packed mask is far from its entropy on ReLU activations: on ResNet18 cuts 60-70% of the
2-bit codes are 0 (ReLU zeros and small positives), and they come in spatial runs (dead
channels, flat image regions). The stage is lossless: the decoded tensor is bit for bit the one
without it, and it codes the sections the codec wrote, so MS's error is unchanged.

Methods (``Choice("entropy", "none", ("none", "zstd"))``):

* ``"none"`` -- the sections travel as the codec wrote them (the default; bytes unchanged).
* ``"zstd"`` -- each data section becomes one Zstandard frame (RFC 8878), level 1, with the
  decompressed size in the frame header and no checksum (the transport checks integrity).

Why zstd level 1: it saves the most bytes per millisecond of compress + decompress time.
On the MS 0.99/2-bit sections of a 64x64x32x32 ResNet18-shallow batch (network trained 20
steps on the synthetic set, one core; ``benchmarks/entropy_stage.py``) it saved 55% of the
bytes at 72 kB/ms; zstd -5 saved 31% (52 kB/ms), zstd 3 54% (40 kB/ms), zstd 9 56% (11 kB/ms),
zlib 1 51% (13 kB/ms), lzma preset 0 57% (2.6 kB/ms). MS 0.99/2 bits then sends 30.6x less
than raw float32 instead of 13.79x, for about 8 ms more encoding and 1 ms more decoding.
Zstd's literals are Huffman coded per byte (four 2-bit codes) and its matches catch the runs of
zeros, so it beats a static order-0 coder of the codes: on an untrained ResNet18 the code
histogram's entropy is 1.33 bits per code, zstd level 1 reaches 1.18. Compressed bytes may
differ between zstd versions; decoding does not depend on them.

Wire form of a coded section (what ``Payload.sections`` holds, so ``nbytes`` and
``len(to_bytes())`` count the coded bytes)::

    bytes   field
    4       zstd frame magic 28 b5 2f fd
    2-14    frame header: window, Frame_Content_Size = the section's decoded length
    ...     compressed blocks; nothing may follow the frame

Defensive decoding: :func:`declared_lengths` reads each frame's declared decoded length
without decompressing; the codec's layout check compares those with the exact lengths the
shape requires (``Payload.from_bytes`` and ``Codec.decode`` both do), and only then
:func:`decode_sections` inflates each frame into a buffer of exactly that length. A frame
that declares no length, declares another one, would inflate past it (a "zip bomb"), carries
trailing bytes or is not a zstd frame raises :class:`PayloadError`; nothing is ever inflated
beyond the length the header's shape implies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import zstandard

from .params import Choice
from .payload import Payload, PayloadError

__all__ = [
    "ENTROPY",
    "METHODS",
    "ZSTD_LEVEL",
    "declared_lengths",
    "decode_payload",
    "decode_sections",
    "encode_sections",
    "method_of",
]

METHODS: tuple[str, ...] = ("none", "zstd")
ENTROPY = Choice("entropy", "none", METHODS)
ZSTD_LEVEL = 1

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def method_of(params: Mapping[str, object]) -> str:
    """The entropy method named in codec parameters (``"none"`` for codecs without it)."""
    return str(params.get("entropy", "none"))


def encode_sections(params: Mapping[str, object], sections: Sequence[bytes]) -> tuple[bytes, ...]:
    """The sections as they travel: unchanged for ``"none"``, else one frame per section."""
    if method_of(params) == "none":
        return tuple(sections)
    # zstandard's (de)compressor objects must not be shared between threads; a fresh one
    # costs microseconds.
    cctx = zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, write_content_size=True, write_checksum=False, write_dict_id=False
    )
    return tuple(cctx.compress(s) for s in sections)


def declared_lengths(
    params: Mapping[str, object], sections: Sequence[bytes | memoryview]
) -> tuple[int, ...]:
    """Decoded length of each section, read from its frame header (no decompression).

    For ``"none"`` these are the sections' own lengths. PayloadError for a section that is not
    one zstd frame declaring its decoded length.
    """
    if method_of(params) == "none":
        return tuple(len(s) for s in sections)
    out = []
    for i, s in enumerate(sections):
        if bytes(s[:4]) != _ZSTD_MAGIC:
            raise PayloadError(f"entropy-coded section {i} is not a zstd frame")
        try:
            n = zstandard.frame_content_size(s)
        except zstandard.ZstdError as e:
            raise PayloadError(f"entropy-coded section {i}: bad zstd frame header ({e})") from None
        if n < 0:
            raise PayloadError(f"entropy-coded section {i}: zstd frame declares no decoded size")
        out.append(int(n))
    return tuple(out)


def decode_sections(
    params: Mapping[str, object], sections: Sequence[bytes | memoryview]
) -> tuple[bytes, ...]:
    """Inverse of :func:`encode_sections`.

    Call it only after the layout check has accepted :func:`declared_lengths`: each frame is
    inflated into a buffer of exactly its declared length, never more.
    """
    if method_of(params) == "none":
        return tuple(bytes(s) for s in sections)
    expected = declared_lengths(params, sections)
    dctx = zstandard.ZstdDecompressor()
    out = []
    for i, (s, n) in enumerate(zip(sections, expected, strict=True)):
        try:
            raw = dctx.decompress(s, max_output_size=n, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise PayloadError(f"entropy-coded section {i}: {e}") from None
        if len(raw) != n:  # zstd checks this too; keep the promise independent of it
            raise PayloadError(f"entropy-coded section {i} inflates to {len(raw)} bytes, not {n}")
        out.append(raw)
    return tuple(out)


def decode_payload(payload: Payload) -> Payload:
    """The same payload with its sections as the codec wrote them (itself for ``"none"``).

    The caller must have checked ``declared_lengths`` against the codec's layout.
    """
    if method_of(payload.params) == "none":
        return payload
    return dataclasses.replace(payload, sections=decode_sections(payload.params, payload.sections))
