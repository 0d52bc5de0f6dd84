"""``fp16`` and ``bf16``: the values in a 16-bit float format, decoded to the input dtype.

Every element is rounded to the nearest representable value (ties to even, torch's ``.to``)
of IEEE 754 binary16 (``fp16``: 5 exponent bits, 10 mantissa bits, largest finite 65504,
values below 2**-24 in magnitude become 0) or bfloat16 (``bf16``: float32's 8 exponent bits, 7
mantissa bits). Relative error per element is at most 2**-11 for ``fp16`` (normal range) and
2**-8 for ``bf16``. ``bf16`` keeps float32's range, which is why mixed-precision training sends
gradients in it without loss scaling (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
Training", arXiv 1905.12322); ``fp16`` is more precise where values fit its range. Encoding a
value that overflows the format raises ValueError instead of sending Inf.

Wire section: the values, 2 bytes each, little-endian (``2*d`` bytes); the header's dtype field
records the input dtype, which the decoder restores. A float16 input to ``fp16`` (or bfloat16
to ``bf16``) round-trips exactly. No parameters, so the header overhead is ``20 + 8*ndim``
bytes, like ``none``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Codec, check_finite
from .dtypes import tensor_from_bytes, tensor_to_bytes
from .error import compression_error
from .payload import Payload
from .registry import register

__all__ = ["BFloat16", "Float16"]


class _HalfPrecision(Codec):
    """Values rounded to ``wire_dtype``; subclasses set the name, id and wire dtype."""

    wire_dtype: ClassVar[torch.dtype]
    section_names = ("values",)

    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        return (2 * math.prod(shape),)

    def _round(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` in the wire dtype (on its device); ValueError if a value overflows it."""
        half = flat.to(self.wire_dtype)
        if half.numel() and not bool(torch.isfinite(half).all()):
            big = float(flat.float().abs().max())
            limit = torch.finfo(self.wire_dtype).max
            raise ValueError(
                f"codec {self.name!r}: a value of magnitude {big:.4g} overflows "
                f"{self.wire_dtype} (largest finite {limit:.4g}); use 'bf16' or 'none'"
            )
        return half

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
        measure: bool,
    ) -> tuple[Payload, float | None]:
        half = self._round(flat)  # the decoded tensor is ``half`` in the input dtype
        payload = self._payload(shape, flat.dtype, [tensor_to_bytes(half)])
        return payload, compression_error(flat, half.to(flat.dtype)) if measure else None

    def _decode(self, payload: Payload, device: torch.device) -> torch.Tensor:
        values = tensor_from_bytes(payload.sections[0], self.wire_dtype, device)
        values = values.to(payload.dtype)  # bf16 values beyond float16's range become inf here
        check_finite(values, f"values (as {payload.dtype})")
        return values


@register
class Float16(_HalfPrecision):
    """IEEE binary16 values on the wire; no parameters."""

    name = "fp16"
    codec_id = 5
    wire_dtype = torch.float16


@register
class BFloat16(_HalfPrecision):
    """bfloat16 values on the wire; no parameters."""

    name = "bf16"
    codec_id = 6
    wire_dtype = torch.bfloat16
