"""``sp``: Top-k sparsification (paper Sec. 4.2 baseline "SP").

Keeps the k = floor((1 - ratio) * d) largest-magnitude elements (at least one) of the whole
tensor; the decoder puts them back and fills zeros elsewhere. Wire sections: positions
(bitmap or 32-bit indices, whichever is smaller) and the kept values in the input dtype, so a
float32 tensor costs ``min(ceil(d/8), 4*k) + 4*k`` bytes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import Codec, check_finite
from .dtypes import itemsize, tensor_from_bytes, tensor_to_bytes
from .error import relative_error, squared_norm
from .params import FloatRange, Param
from .payload import Payload
from .positions import INDEX_FLAG, decode_positions, encode_positions, positions_nbytes
from .registry import register
from .selection import keep_count, top_indices

__all__ = ["RATIO", "TopKCodec"]

RATIO = FloatRange("ratio", 0.99, 0.0, 1.0)


@register
class TopKCodec(Codec):
    """Top-k sparsification; params: ``ratio`` in (0, 1), the fraction of elements dropped."""

    name = "sp"
    codec_id = 2
    param_specs: ClassVar[tuple[Param, ...]] = (RATIO,)
    section_names = ("positions", "values")
    flag_mask = INDEX_FLAG

    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        d = math.prod(shape)
        k = keep_count(self._ratio, d)
        return positions_nbytes(d, k), k * itemsize(dtype)

    @property
    def _ratio(self) -> float:
        return float(self._params["ratio"])  # type: ignore[arg-type]

    def _select(
        self, mag: torch.Tensor, k: int, generator: torch.Generator | None, train: bool
    ) -> torch.Tensor:
        """Sorted positions of the k elements to keep, given the magnitudes (1-D)."""
        return top_indices(mag.unsqueeze(0), k)[0]

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
        measure: bool,
    ) -> tuple[Payload, float | None]:
        """Select on the tensor's device; with ``measure``, the norm of the dropped elements."""
        d = flat.numel()
        k = keep_count(self._ratio, d)
        x = flat.float()
        idx = self._select(x.abs(), k, generator, train)
        positions, flags = encode_positions(idx, d)
        values = tensor_to_bytes(flat[idx])
        error = None
        if measure:
            norm_sq = squared_norm(x)
            dropped = x.clone() if flat.dtype == torch.float32 else x  # x may alias flat
            dropped[idx] = 0.0  # the decoder restores kept values exactly, zeros elsewhere
            error = relative_error(squared_norm(dropped), norm_sq)
        return self._payload(shape, flat.dtype, [positions, values], flags), error

    def _decode(self, payload: Payload, device: torch.device) -> torch.Tensor:
        d = payload.numel
        k = keep_count(self._ratio, d)
        idx = decode_positions(payload.sections[0], d, k, payload.flags, device)
        values = tensor_from_bytes(payload.sections[1], payload.dtype, device)
        check_finite(values, "kept values")
        out = torch.zeros(d, dtype=payload.dtype, device=device)
        out[idx] = values
        return out
