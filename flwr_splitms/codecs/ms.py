"""``ms``: Mask-Encoded Sparsification (paper Sec. 4.1, Algorithms 1 and 2, Fig. 1).

Encoding (Alg. 1): keep the k = floor((1 - ratio) * d) largest elements (by magnitude; at
least one when d > 0) as a vector of values in their original order; Top_min is the smallest
kept magnitude. Every element gets a b-bit code: kept positions get 2^b - 1, every other
element ``q = round(|x| * (2^b - 1) / Top_min)`` (``rounding="nearest"``, as the authors' code)
or ``floor(...)`` (``rounding="floor"``, as Alg. 1 prints), clamped to 2^b - 2. The kept
positions come from the top-k indices, not from a ``|x| >= Top_min`` test, so ties at Top_min
still yield exactly k codes 2^b - 1 (tied non-kept elements get 2^b - 2).

Decoding (Alg. 2): Top_min = the smallest magnitude among the received values; positions with
code 2^b - 1 take the values in order; the others ``q * Top_min / (2^b - 1)``.

Signs: with ``signed=True``, or ``"auto"`` (default) when the tensor has a negative value, each
code carries one more bit, the sign, above the b magnitude bits (0 on kept positions, whose
values carry their sign). ``signed=False`` refuses negative input. Scope: ``"tensor"`` (default,
as the authors' code) runs one top-k over the whole tensor; ``"sample"`` runs it per sample
along dim 0 (k = floor((1 - ratio) * d / N) per sample, each with its own Top_min, recovered
from that sample's values). A 0-d tensor is one sample.

Wire sections: the packed codes, ``ceil(d * (b + s) / 8)`` bytes (s = 1 with the sign bit,
recorded in flag bit 0), and the kept values in the input dtype (``4*k`` bytes for float32).
Fig. 1 (16 floats, top-4, 2-bit mask): 4 + 16 = 20 bytes. An all-zero tensor round-trips
exactly (Top_min = 0 gives code 0 everywhere else).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import bitpack
from .base import Codec, check_finite
from .dtypes import itemsize, tensor_from_bytes, tensor_to_bytes
from .params import Choice, IntRange
from .payload import Payload, PayloadError
from .registry import register
from .selection import keep_count, top_indices
from .topk import RATIO

__all__ = ["MaskEncodedSparsification"]

SIGN_FLAG = 0x01


@register
class MaskEncodedSparsification(Codec):
    """MS; params: ``ratio`` (0, 1) default 0.99, ``bits`` 1..8 default 2, ``rounding``
    ("nearest" | "floor"), ``signed`` ("auto" | True | False), ``scope`` ("tensor" | "sample").
    """

    name = "ms"
    codec_id = 4
    param_specs = (
        RATIO,
        IntRange("bits", 2, 1, 8),
        Choice("rounding", "nearest", ("nearest", "floor")),
        Choice("signed", "auto", ("auto", True, False)),
        Choice("scope", "tensor", ("tensor", "sample")),
    )
    section_names = ("mask", "values")
    flag_mask = SIGN_FLAG

    @property
    def _bits(self) -> int:
        return int(self._params["bits"])  # type: ignore[call-overload]

    def _layout(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(rows, elements per row, kept per row) for this codec's scope."""
        d = math.prod(shape)
        rows = shape[0] if self._params["scope"] == "sample" and len(shape) >= 1 else 1
        if d == 0:
            return rows, 0, 0
        m = d // rows
        return rows, m, keep_count(float(self._params["ratio"]), m)  # type: ignore[arg-type]

    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        signed = flags & SIGN_FLAG
        if (signed and self._params["signed"] is False) or (
            not signed and self._params["signed"] is True
        ):
            raise PayloadError(f"sign flag {signed} contradicts signed={self._params['signed']}")
        rows, _, kr = self._layout(shape)
        d = math.prod(shape)
        return bitpack.packed_nbytes(d, self._bits + signed), rows * kr * itemsize(dtype)

    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
    ) -> Payload:
        b = self._bits
        top_code = (1 << b) - 1
        x = flat.float().numpy()  # elementwise work in numpy: single-threaded, predictable
        negative = x.size > 0 and bool(x.min() < 0)
        if negative and self._params["signed"] is False:
            raise ValueError(
                "ms with signed=False got negative values; use signed='auto' (adds a sign bit "
                "only when needed) or signed=True"
            )
        s = int(self._params["signed"] is True or negative)
        rows, m, kr = self._layout(shape)
        if x.size == 0:
            return self._payload(shape, flat.dtype, [b"", b""], s)

        mag = np.abs(x).reshape(rows, m)
        idx = top_indices(torch.from_numpy(mag), kr).numpy()  # ascending: the original order
        top_min = np.take_along_axis(mag, idx, axis=1).min(axis=1, keepdims=True)
        with np.errstate(divide="ignore", over="ignore"):
            scale = np.float32(top_code) / top_min
        if np.all(np.isfinite(scale)):
            q = np.multiply(mag, scale, out=mag)
        else:  # Top_min is 0 (then the row's other elements are 0 too) or subnormal
            q = np.divide(mag, np.where(top_min > 0, top_min, np.float32(1)), out=mag)
            q *= np.float32(top_code)
        if self._params["rounding"] == "nearest":
            np.rint(q, out=q)  # half to even, like torch.round in the authors' code
        else:
            np.floor(q, out=q)
        np.minimum(q, top_code - 1, out=q)
        codes = q.astype(np.uint8 if b + s <= 8 else np.uint16)
        if s:
            codes |= np.left_shift((x < 0).reshape(rows, m).astype(codes.dtype), b)
        np.put_along_axis(codes, idx, top_code, axis=1)  # also clears kept positions' sign
        values = flat.view(rows, m).gather(1, torch.from_numpy(idx)).reshape(-1)
        mask = bitpack.pack(codes.reshape(-1), b + s)
        return self._payload(shape, flat.dtype, [mask, tensor_to_bytes(values)], s)

    def _decode(self, payload: Payload) -> torch.Tensor:
        b = self._bits
        top_code = (1 << b) - 1
        s = payload.flags & SIGN_FLAG
        rows, m, kr = self._layout(payload.shape)
        if payload.numel == 0:
            return torch.zeros(0)
        codes = bitpack.unpack(payload.sections[0], b + s, payload.numel).reshape(rows, m)
        q = codes & codes.dtype.type(top_code) if s else codes
        kept = q == top_code
        per_row = np.count_nonzero(kept, axis=1)
        if np.any(per_row != kr):
            raise PayloadError(
                f"mask marks {int(per_row.sum())} kept positions ({kr} per row expected), "
                f"the payload holds {rows * kr} values"
            )
        values = tensor_from_bytes(payload.sections[1], payload.dtype).float()
        check_finite(values, "kept values")
        vals = values.numpy().reshape(rows, kr)
        step = np.abs(vals).min(axis=1, keepdims=True) / np.float32(top_code)
        out = np.multiply(q, step, dtype=np.float32)
        if s:
            np.negative(out, out=out, where=(codes >> b).astype(bool))
        out[kept] = vals.reshape(-1)  # row-major: each row's values in original order
        return torch.from_numpy(out.reshape(-1))
