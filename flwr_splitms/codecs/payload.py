"""Payloads and their self-describing wire format.

A :class:`Payload` is what a codec's ``encode`` returns: the codec name and parameters, the
shape and dtype of the encoded tensor, a few flag bits, and the data sections (mask or codes,
values, scales). ``Payload.nbytes`` counts the data sections only; ``to_bytes`` adds a header.

Wire format, version 1 (all integers little-endian)::

    offset  size       field
    0       4          magic b"FSMS"
    4       1          format version (1)
    5       1          codec id: 0 none, 1 qu, 2 sp, 3 rt, 4 ms, 5 fp16, 6 bf16
    6       1          dtype: 0 float32, 1 float16, 2 bfloat16
    7       1          flags (codec specific: ms bit 0 = sign bit in use; sp/rt bit 0 = 32-bit
                       indices instead of a bitmap)
    8       1          ndim (at most 32)
    9       1          number of data sections
    10      2          P = byte length of the codec parameters
    12      P          codec parameters, fixed layout per codec (float64 for ratio/alpha,
                       uint8 for bits and for choices such as rounding/signed/scope)
    12+P    8*ndim     shape, uint64 each
    ...     8*S        byte length of each data section, uint64 each
    ...                the data sections, back to back

Header overhead = 12 + P + 8*ndim + 8*S bytes, a constant per codec and tensor rank:

    codec   P   S   overhead            4-d activation (N, C, H, W)
    none    0   1   20 + 8*ndim         52 bytes
    qu      1   2   29 + 8*ndim         61 bytes
    sp      8   2   36 + 8*ndim         68 bytes
    rt     16   2   44 + 8*ndim         76 bytes
    ms     13   2   41 + 8*ndim         73 bytes
    fp16    0   1   20 + 8*ndim         52 bytes  (bf16 the same)

Decoding is defensive: ``from_bytes`` checks the magic, version, codec id, dtype, rank,
parameters, the declared element count (at most 2**31, size-0 dimensions counted as 1) and
every section length against the blob length and against what the codec requires for the
declared shape, all before copying or allocating anything, and raises :class:`PayloadError`
on any mismatch. The codecs' decoders
then validate the content (code counts, index ranges, finite values). With ``entropy="zstd"``
(``ms``) the sections are zstd frames and the layout check compares the decoded lengths their
headers declare (``entropy.py``).

This module is the bottom of the codec package: it knows codecs only as the registry describes
them (``registry.CodecClass``: name, wire id, parameter layout, layout check), not their code.
Decoding bytes with the codec their header names is ``dispatch.decode_bytes``.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass, field

import torch

from .dtypes import dtype_code, dtype_from_code, itemsize
from .registry import codec_class, codec_class_for_id

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NDIM",
    "MAX_NUMEL",
    "Payload",
    "PayloadError",
    "shape_within_limits",
]

MAGIC = b"FSMS"
FORMAT_VERSION = 1
MAX_NDIM = 32
MAX_NUMEL = 2**31

_FIXED = struct.Struct("<4sBBBBBBH")


def shape_within_limits(shape: tuple[int, ...]) -> bool:
    """At most MAX_NDIM dims and MAX_NUMEL elements, counting size-0 dims as 1.

    Counting zeros as ones keeps shapes such as (0, 2**63) out: they hold no data but would
    overflow torch's size arithmetic.
    """
    return len(shape) <= MAX_NDIM and math.prod(max(int(s), 1) for s in shape) <= MAX_NUMEL


class PayloadError(ValueError):
    """Malformed, truncated or inconsistent payload bytes."""


@dataclass(frozen=True)
class Payload:
    """An encoded tensor: codec identity, tensor metadata and the data sections.

    ``nbytes`` is the size of the data sections (what the codec's byte formula counts);
    ``raw_nbytes`` is what sending the tensor uncompressed in its own dtype costs;
    ``len(payload.to_bytes()) == payload.nbytes + payload.header_nbytes``.
    """

    codec: str
    params: dict[str, object]
    shape: tuple[int, ...]
    dtype: torch.dtype
    sections: tuple[bytes, ...]
    flags: int = 0
    _nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "sections", tuple(self.sections))
        object.__setattr__(self, "_nbytes", sum(len(s) for s in self.sections))

    @property
    def numel(self) -> int:
        """Number of elements of the encoded tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the data sections (mask/codes, values, scales), header excluded.

        Values travel in the input dtype: 4 bytes each for float32, 2 for float16/bfloat16.
        """
        return self._nbytes

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the uncompressed tensor in its own dtype: numel * element size."""
        return self.numel * itemsize(self.dtype)

    @property
    def header_nbytes(self) -> int:
        """Bytes the header adds in ``to_bytes``: 12 + params + 8 per dim + 8 per section."""
        pstruct = codec_class(self.codec).param_struct
        return _FIXED.size + pstruct.size + 8 * len(self.shape) + 8 * len(self.sections)

    def to_bytes(self) -> bytes:
        """Serialize: header (magic, version, codec, params, dtype, shape, lengths) + sections."""
        cls = codec_class(self.codec)
        pstruct = cls.param_struct
        wire_params = [spec.to_wire(self.params[spec.name]) for spec in cls.param_specs]
        ndim, nsec = len(self.shape), len(self.sections)
        if ndim > MAX_NDIM:
            raise ValueError(f"payloads support at most {MAX_NDIM} dimensions, got {ndim}")
        header = b"".join(
            [
                _FIXED.pack(
                    MAGIC,
                    FORMAT_VERSION,
                    cls.codec_id,
                    dtype_code(self.dtype),
                    self.flags,
                    ndim,
                    nsec,
                    pstruct.size,
                ),
                pstruct.pack(*wire_params),
                struct.pack(f"<{ndim}Q", *self.shape),
                struct.pack(f"<{nsec}Q", *(len(s) for s in self.sections)),
            ]
        )
        return header + b"".join(self.sections)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> Payload:
        """Parse bytes written by ``to_bytes``; PayloadError for anything malformed."""
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise TypeError(f"from_bytes takes bytes, bytearray or memoryview, not {type(blob)}")
        mv = memoryview(blob)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        if n < _FIXED.size:
            raise PayloadError(f"truncated payload: {n} bytes, a header needs {_FIXED.size}")
        magic, version, cid, dcode, flags, ndim, nsec, plen = _FIXED.unpack_from(mv, 0)
        if magic != MAGIC:
            raise PayloadError(f"not an flwr-splitms payload: magic {bytes(magic)!r} != {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise PayloadError(
                f"unsupported payload format version {version}; this library reads "
                f"version {FORMAT_VERSION}"
            )
        codec_cls = codec_class_for_id(cid)
        if codec_cls is None:
            raise PayloadError(f"unknown codec id {cid} in payload header")
        try:
            dtype = dtype_from_code(dcode)
        except KeyError:
            raise PayloadError(f"unknown dtype code {dcode} in payload header") from None
        if ndim > MAX_NDIM:
            raise PayloadError(f"payload declares {ndim} dimensions; the limit is {MAX_NDIM}")
        if nsec != len(codec_cls.section_names):
            raise PayloadError(
                f"codec {codec_cls.name!r} has {len(codec_cls.section_names)} data sections, "
                f"the header declares {nsec}"
            )
        pstruct = codec_cls.param_struct
        if plen != pstruct.size:
            raise PayloadError(
                f"codec {codec_cls.name!r} parameters take {pstruct.size} bytes, "
                f"the header declares {plen}"
            )
        off = _FIXED.size
        header_len = off + plen + 8 * ndim + 8 * nsec
        if n < header_len:
            raise PayloadError(f"truncated payload: {n} bytes, its header alone needs {header_len}")

        raw = pstruct.unpack_from(mv, off)
        off += plen
        try:
            params = {
                s.name: s.from_wire(r) for s, r in zip(codec_cls.param_specs, raw, strict=True)
            }
            codec = codec_cls(**params)
        except ValueError as e:
            raise PayloadError(f"invalid {codec_cls.name!r} parameters in header: {e}") from None

        shape = struct.unpack_from(f"<{ndim}Q", mv, off)
        off += 8 * ndim
        if not shape_within_limits(shape):
            raise PayloadError(
                f"payload declares shape {shape}; the limit is {MAX_NUMEL} elements "
                "(dimensions of size 0 counted as 1)"
            )
        lengths = struct.unpack_from(f"<{nsec}Q", mv, off)
        off += 8 * nsec
        declared = sum(lengths)
        present = n - header_len
        if declared > present:
            raise PayloadError(
                f"truncated payload: header declares {declared} data bytes, {present} present"
            )
        if declared < present:
            raise PayloadError(
                f"{present - declared} bytes of trailing garbage after the declared sections"
            )
        views = [mv[a:b] for a, b in itertools.pairwise(itertools.accumulate(lengths, initial=off))]
        codec.check_sections(shape, dtype, flags, views)  # before copying anything

        sections = [bytes(v) for v in views]
        return cls(
            codec=codec_cls.name,
            params=codec.params,
            shape=shape,
            dtype=dtype,
            sections=tuple(sections),
            flags=flags,
        )
