"""``qu``: b-bit uniform quantization between the tensor's min and max (paper baseline "QU").

Every element gets ``q = round((x - min) * (2^b - 1) / (max - min))`` (deterministic nearest
rounding, as the MS authors' baseline) and decodes to ``min + q * (max - min) / (2^b - 1)``.
Wire sections: the packed codes, ``ceil(d*b/8)`` bytes, and min and max as two little-endian
float32 (8 bytes). Min and max are values of the tensor, exact in float32 for every supported
dtype, so a constant tensor round-trips exactly. Paper policy: 3 bits.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from . import bitpack
from .base import Codec
from .params import IntRange
from .payload import Payload, PayloadError
from .registry import register

__all__ = ["UniformQuantization"]

_SCALES = struct.Struct("<ff")
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32


@register
class UniformQuantization(Codec):
    """Min-max uniform quantization; params: ``bits`` in 1..16 (default 3)."""

    name = "qu"
    codec_id = 1
    param_specs = (IntRange("bits", 3, 1, 16),)
    section_names = ("codes", "scales")

    @property
    def _bits(self) -> int:
        return int(self._params["bits"])  # type: ignore[call-overload]

    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        return bitpack.packed_nbytes(math.prod(shape), self._bits), _SCALES.size

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
    ) -> Payload:
        levels = (1 << self._bits) - 1
        if flat.numel() == 0:
            return self._payload(shape, flat.dtype, [b"", _SCALES.pack(0.0, 0.0)])
        x = flat.float().numpy()
        lo, hi = float(x.min()), float(x.max())
        span = hi - lo  # in float64: may exceed the float32 range
        if span == 0.0:
            codes = np.zeros(x.size, dtype=np.uint8)
        else:
            work = _work_dtype(span, levels)
            q = np.subtract(x, lo, dtype=work)
            q *= work(levels / span)
            np.rint(q, out=q)
            np.clip(q, 0, levels, out=q)
            codes = q.astype(np.uint8 if levels <= 0xFF else np.uint16)
        sections = [bitpack.pack(codes, self._bits), _SCALES.pack(lo, hi)]
        return self._payload(shape, flat.dtype, sections)

    def _decode(self, payload: Payload) -> torch.Tensor:
        levels = (1 << self._bits) - 1
        d = payload.numel
        lo, hi = _SCALES.unpack(payload.sections[1])
        ends = torch.tensor([lo, hi], dtype=torch.float64)
        # The encoder stores two values of the tensor: finite, ordered, exact in its dtype
        # (which also keeps every decoded value inside the dtype's range).
        if not (
            math.isfinite(lo)
            and math.isfinite(hi)
            and lo <= hi
            and torch.equal(ends.to(payload.dtype).double(), ends)
        ):
            raise PayloadError(f"invalid quantization range [{lo}, {hi}] for {payload.dtype}")
        codes = bitpack.unpack(payload.sections[0], self._bits, d)
        if d == 0:
            return torch.zeros(0)
        span = hi - lo
        work = _work_dtype(span, levels)
        out = np.multiply(codes, work(span / levels), dtype=work)
        out += work(lo)
        return torch.from_numpy(out)


def _work_dtype(span: float, levels: int) -> type[np.floating]:
    """float32, unless the range or the quantization step leaves the normal float32 range."""
    if span == 0.0 or (span <= _F32_MAX and span / levels >= _F32_TINY):
        return np.float32
    return np.float64
