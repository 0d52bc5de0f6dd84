"""``none``: no compression; the values travel as they are (4*d bytes for float32).

The baseline every saving is measured against, and a way to run the split protocol without
compression through the same code path.
"""

from __future__ import annotations

import math

import torch

from .base import Codec, check_finite
from .dtypes import itemsize, tensor_from_bytes, tensor_to_bytes
from .payload import Payload
from .registry import register

__all__ = ["Identity"]


@register
class Identity(Codec):
    """Raw values in the input dtype; no parameters."""

    name = "none"
    codec_id = 0
    section_names = ("values",)

    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        return (math.prod(shape) * itemsize(dtype),)

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
        measure: bool,
    ) -> tuple[Payload, float | None]:
        return self._payload(shape, flat.dtype, [tensor_to_bytes(flat)]), 0.0  # lossless

    def _decode(self, payload: Payload, device: torch.device) -> torch.Tensor:
        values = tensor_from_bytes(payload.sections[0], payload.dtype, device)
        check_finite(values, "values")
        return values
