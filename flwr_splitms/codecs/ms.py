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
from .base import Codec, check_finite, require_finite
from .dtypes import itemsize, tensor_from_bytes, tensor_to_bytes, to_host_bytes
from .entropy import ENTROPY
from .params import Choice, IntRange
from .payload import Payload, PayloadError
from .error import relative_error, squared_norm
from .registry import register
from .selection import flat_nonzero, keep_count, top_indices
from .topk import RATIO

__all__ = ["MaskEncodedSparsification"]

SIGN_FLAG = 0x01


@register
class MaskEncodedSparsification(Codec):
    """MS; params: ``ratio`` (0, 1) default 0.99, ``bits`` 1..8 default 2, ``rounding``
    ("nearest" | "floor"), ``signed`` ("auto" | True | False), ``scope`` ("tensor" | "sample"),
    ``entropy`` ("none" | "zstd": lossless stage on the sections, ``entropy.py``).
    """

    name = "ms"
    codec_id = 4
    param_specs = (
        RATIO,
        IntRange("bits", 2, 1, 8),
        Choice("rounding", "nearest", ("nearest", "floor")),
        Choice("signed", "auto", ("auto", True, False)),
        Choice("scope", "tensor", ("tensor", "sample")),
        ENTROPY,  # lossless stage on the sections ("none" | "zstd"), see entropy.py
    )
    section_names = ("mask", "values")
    flag_mask = SIGN_FLAG
    checks_finite = True  # from the min that decides the sign bit

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
        return self._encode_impl(flat, shape, measure=False)[0]

    def _encode_measured(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
    ) -> tuple[Payload, float]:
        return self._encode_impl(flat, shape, measure=True)

    def _encode_impl(
        self, flat: torch.Tensor, shape: tuple[int, ...], *, measure: bool
    ) -> tuple[Payload, float]:
        """Alg. 1 on the tensor's device; with ``measure``, also the error the decoder sees.

        The error needs no decode: kept positions are exact, every other one decodes to
        ``q * Top_min / (2^b - 1)`` (cast to the input dtype) with the sign of ``x``.
        """
        b = self._bits
        top_code = (1 << b) - 1
        rows, m, kr = self._layout(shape)
        if flat.numel() == 0:
            s = int(self._params["signed"] is True)
            return self._payload(shape, flat.dtype, [b"", b""], s), 0.0
        lo, _ = require_finite(self.name, *torch.aminmax(flat))
        negative = lo < 0
        if negative and self._params["signed"] is False:
            raise ValueError(
                "ms with signed=False got negative values; use signed='auto' (adds a sign bit "
                "only when needed) or signed=True"
            )
        s = int(self._params["signed"] is True or negative)
        x = flat.float().view(rows, m)  # no copy for float32
        mag = x.abs() if negative else x
        idx = top_indices(mag, kr)  # ascending: the original order
        values = flat.view(rows, m).gather(1, idx).reshape(-1)
        top_min = mag.gather(1, idx).amin(dim=1, keepdim=True)
        scale = torch.full_like(top_min, float(top_code)) / top_min
        q = torch.empty_like(mag)
        if bool(torch.isfinite(scale).all()):
            torch.mul(mag, scale, out=q)
        else:  # Top_min is 0 (then the row's other elements are 0 too) or subnormal
            torch.div(mag, torch.where(top_min > 0, top_min, torch.ones_like(top_min)), out=q)
            q.mul_(float(top_code))
        if self._params["rounding"] == "nearest":
            q.round_()  # half to even, like torch.round in the authors' code
        else:
            q.floor_()
        q.clamp_(max=top_code - 1)
        error = self._error(x, mag, q, idx, top_min, top_code, flat.dtype) if measure else 0.0
        if s:
            q.add_(torch.lt(x, 0), alpha=float(1 << b))
        q.scatter_(1, idx, float(top_code))  # also clears kept positions' sign
        mask = to_host_bytes(bitpack.pack_float_codes(q, b + s))
        return self._payload(shape, flat.dtype, [mask, tensor_to_bytes(values)], s), error

    @staticmethod
    def _error(
        x: torch.Tensor,
        mag: torch.Tensor,
        q: torch.Tensor,
        idx: torch.Tensor,
        top_min: torch.Tensor,
        top_code: int,
        dtype: torch.dtype,
    ) -> float:
        """Relative error of the decoded tensor, from the codes ``q`` (before sign and kept)."""
        recon = q * (top_min / float(top_code))  # the decoder's step: Top_min / (2^b - 1)
        if dtype != torch.float32:
            recon = recon.to(dtype).float()
        recon.sub_(mag)  # |x - x_hat| off the kept positions: the sign is shared
        recon.scatter_(1, idx, 0.0)  # kept positions decode exactly
        return relative_error(squared_norm(recon), squared_norm(x))

    def _decode(self, payload: Payload) -> torch.Tensor:
        return self._decode_to(payload, torch.device("cpu"))

    def _decode_to(self, payload: Payload, device: torch.device) -> torch.Tensor:
        """Alg. 2 on ``device``.

        Code widths 1, 2, 4 and 8 (``bits + sign``) dequantize straight from the packed
        bytes through a 256-entry table per sample (one gather writes the whole output) and
        find the kept codes with a few bitwise operations on the bytes; other widths unpack
        the codes first.
        """
        b = self._bits
        top_code = (1 << b) - 1
        s = payload.flags & SIGN_FLAG
        rows, m, kr = self._layout(payload.shape)
        n = payload.numel
        if n == 0:
            return torch.zeros(0, device=device)
        values = tensor_from_bytes(payload.sections[1], payload.dtype, device).float()
        check_finite(values, "kept values")
        step = values.view(rows, kr).abs().amin(dim=1, keepdim=True) / float(top_code)
        w = b + s
        if w in (1, 2, 4, 8) and (rows == 1 or (m * w) % 8 == 0):
            out, kept = self._dequantize_bytes(payload.sections[0], step, rows, n, s, device)
        else:
            codes = bitpack.unpack(payload.sections[0], w, n, device).view(rows, m)
            q = codes & top_code if s else codes
            out = q.to(torch.float32)
            out.mul_(step)
            if s:
                out = torch.where((codes >> b).bool(), -out, out)
            out = out.view(-1)
            kept = flat_nonzero((q == top_code).view(-1))
        per_row = kept.numel() if rows == 1 else torch.bincount(kept // m, minlength=rows)
        if (per_row != kr) if rows == 1 else bool((per_row != kr).any()):
            raise PayloadError(
                f"mask marks {kept.numel()} kept positions ({kr} per row expected), "
                f"the payload holds {rows * kr} values"
            )
        out.index_copy_(0, kept, values)  # ascending positions: rows' values in original order
        return out

    def _dequantize_bytes(
        self,
        packed: bytes,
        step: torch.Tensor,
        rows: int,
        n: int,
        s: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded values, kept positions are placeholders; ascending kept positions)."""
        b = self._bits
        top_code = (1 << b) - 1
        w = b + s
        per = 8 // w
        raw = bitpack.load(packed, w, n, device)
        lanes = bitpack.lane_codes(w).to(device)  # (256, per)
        q = lanes & top_code
        table = q.to(torch.float32).unsqueeze(0) * step.unsqueeze(2)  # (rows, 256, per)
        if s:
            table = torch.where((lanes >> b).bool(), -table, table)
        index = raw.to(torch.int64)
        if rows > 1:  # each sample's bytes look up its own table
            index.view(rows, -1).add_(torch.arange(rows, device=device).unsqueeze(1) * 256)
        if per == 8:
            out = table.view(-1, 8).index_select(0, index)
        else:  # one element per byte pattern: a 1-D gather, the fast kernel
            entry = {1: torch.float32, 2: torch.float64, 4: torch.complex128}[per]
            out = table.view(-1).view(entry).index_select(0, index).view(torch.float32)
        # A lane holds a kept code iff its b magnitude bits are all set.
        lane_bits = sum(1 << (j * w) for j in range(per))
        hits = raw.clone()
        for i in range(1, b):
            hits &= raw >> i
        hits &= lane_bits
        if device.type == "cpu":
            where = torch.from_numpy(np.flatnonzero(hits.numpy()))
        else:
            where = flat_nonzero(hits != 0)
        lane = torch.arange(per, device=device)
        flags = (hits.index_select(0, where).unsqueeze(1) >> (lane * w)) & 1
        pos = (where.unsqueeze(1) * per + lane).view(-1)
        return out.view(-1)[:n], pos.index_select(0, flat_nonzero(flags.view(-1).bool()))
