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

import torch

from . import bitpack
from .base import Codec, require_finite
from .dtypes import to_host_bytes
from .error import relative_error, squared_norm
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
    checks_finite = True  # from the min and max that set the range

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
        measure: bool,
    ) -> tuple[Payload, float | None]:
        """Quantize on the tensor's device; with ``measure``, the dequantized values' error."""
        bits = self._bits
        levels = (1 << bits) - 1
        if flat.numel() == 0:
            return self._payload(shape, flat.dtype, [b"", _SCALES.pack(0.0, 0.0)]), 0.0
        lo, hi = require_finite(self.name, *torch.aminmax(flat))
        span = hi - lo  # in float64: may exceed the float32 range
        scales = _SCALES.pack(lo, hi)
        if span == 0.0:  # constant tensor: all codes 0, decoded exactly
            codes = bytes(bitpack.packed_nbytes(flat.numel(), bits))
            return self._payload(shape, flat.dtype, [codes, scales]), 0.0
        work = _work_dtype(span, levels)
        if work == torch.float64 and flat.device.type == "mps":  # MPS has no float64
            x = flat.cpu().to(work)
        else:
            x = flat.to(work)
        q = x - _rounded(lo, work)
        q.mul_(_rounded(levels / span, work))
        q.round_()  # half to even
        q.clamp_(0, levels)
        error = None
        if measure:
            recon = q * _rounded(span / levels, work)  # exactly what the decoder computes
            recon.add_(_rounded(lo, work))
            recon = recon.to(flat.dtype).float()
            ref = flat.float()
            recon.sub_(ref.to(recon.device))
            error = relative_error(squared_norm(recon), squared_norm(ref))
        packed = bitpack.pack_float_codes(q, bits) if bits <= 4 else bitpack.pack(q.int(), bits)
        return self._payload(shape, flat.dtype, [to_host_bytes(packed), scales]), error

    def _decode(self, payload: Payload, device: torch.device) -> torch.Tensor:
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
        span = hi - lo
        work = _work_dtype(span, levels)
        on = torch.device("cpu") if work == torch.float64 and device.type == "mps" else device
        codes = bitpack.unpack(payload.sections[0], self._bits, d, on)
        if d == 0:
            return torch.zeros(0, device=device)
        out = codes.to(work)
        out.mul_(_rounded(span / levels, work))
        out.add_(_rounded(lo, work))
        return out.to(device)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (as numpy's ``float32(value)``), so that scalar
    arithmetic is the same on every device and backend."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _work_dtype(span: float, levels: int) -> torch.dtype:
    """float32, unless the range or the quantization step leaves the normal float32 range."""
    if span == 0.0 or (span <= _F32_MAX and span / levels >= _F32_TINY):
        return torch.float32
    return torch.float64
