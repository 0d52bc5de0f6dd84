"""The ``Codec`` interface shared by all compression schemes.

``Codec.encode`` validates the input once (a finite float32/float16/bfloat16 tensor of any
shape, on any device) and hands a flat view, on the tensor's own device, to the codec's
``_encode``; ``Codec.decode`` checks that the payload belongs to this codec and that its
section lengths are exactly what the codec requires, then undoes the entropy stage, before the
codec's ``_decode`` touches the data on the requested device. ``Codec.encode_measured`` also
returns the compression error, which codecs compute from what their encoder already has.

A codec author writes two hooks: ``_encode`` (the payload and, when asked, the error) and
``_decode`` (the flat tensor on a given device), plus ``expected_section_nbytes``.
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from . import entropy
from .dtypes import SUPPORTED_DTYPES, resolve_device
from .error import compression_error
from .params import Param
from .payload import MAX_NDIM, MAX_NUMEL, Payload, PayloadError, shape_within_limits

__all__ = ["Codec", "check_finite", "require_finite"]


class Codec(ABC):
    """A lossy (or lossless) tensor compressor with a real, byte-exact wire form.

    Subclasses set ``name``, ``codec_id``, ``param_specs`` and ``section_names`` and implement
    ``expected_section_nbytes``, ``_encode`` and ``_decode``; ``@register`` (``registry``) makes
    them known to ``get_codec`` and to the wire format. A codec whose payload tells cheaply where
    it sends something overrides ``support``.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    param_specs: ClassVar[tuple[Param, ...]] = ()
    section_names: ClassVar[tuple[str, ...]]
    flag_mask: ClassVar[int] = 0
    param_struct: ClassVar[struct.Struct]
    # True when the codec's ``_encode`` checks finiteness itself (from a min/max it needs
    # anyway, with ``require_finite``), so that ``encode`` does not scan the tensor twice.
    checks_finite: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.param_struct = struct.Struct("<" + "".join(s.wire_format for s in cls.param_specs))

    def __init__(self, **params: object) -> None:
        specs = {s.name: s for s in self.param_specs}
        for key in params:
            if key not in specs:
                valid = ", ".join(specs) or "(none)"
                raise ValueError(
                    f"unknown parameter {key!r} for codec {self.name!r}; valid: {valid}"
                )
        self._params = {s.name: s.validate(params.get(s.name, s.default)) for s in self.param_specs}

    @property
    def params(self) -> dict[str, object]:
        """All parameters, defaults included: ``get_codec(c.name, **c.params)`` rebuilds ``c``."""
        return dict(self._params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"get_codec({self.name!r}{', ' if args else ''}{args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Codec):
            return NotImplemented
        return self.name == other.name and self._params == other._params

    def __hash__(self) -> int:
        return hash((self.name, tuple(self._params.items())))

    # -- public API ---------------------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> Payload:
        """Compress ``x`` (any shape; float32/float16/bfloat16; any device; finite values).

        The work runs on ``x``'s device; the payload bytes are the same on every device.
        ``generator`` (a CPU ``torch.Generator``) drives the randomness of ``rt``; None uses
        torch's global RNG. ``train=False`` makes ``rt`` plain Top-k. Other codecs ignore both.
        """
        flat = self._flat_input(x)
        shape = tuple(x.shape)
        payload, _ = self._encode(flat, shape, generator=generator, train=train, measure=False)
        return payload

    def encode_measured(
        self,
        x: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        train: bool = True,
    ) -> tuple[Payload, float]:
        """``encode`` plus the relative error ``||x - decode(payload)|| / ||x||``.

        Same value and edge cases as ``compression_error(x, decode(payload))`` (0.0 for an
        all-zero ``x``), but computed from what the encoder already has instead of a second
        full decode. Use it to log the error of every transmitted activation cheaply.
        """
        flat = self._flat_input(x)
        shape = tuple(x.shape)
        payload, error = self._encode(flat, shape, generator=generator, train=train, measure=True)
        if error is None:  # the codec did not measure: decode on the input's device
            error = compression_error(flat.view(shape), self.decode(payload, device=flat.device))
        return payload, error

    def decode(self, payload: Payload, *, device: torch.device | str | None = None) -> torch.Tensor:
        """Reconstruct the tensor: same shape and dtype as the encoded one.

        The result is on ``device`` (default: the CPU); the decoding work runs there too.
        """
        dev = resolve_device(device)
        flat = self._decode(self._checked(payload), dev)
        return flat.to(payload.dtype).reshape(payload.shape)

    def support(self, payload: Payload) -> torch.Tensor:
        """Bool mask, the payload's shape, on the CPU: the positions where it sends something.

        Computed from the payload's bytes alone, so the encoder (on the payload it wrote) and
        the decoder (on the payload it received) get the same mask bit for bit. This default
        takes the nonzero entries of the payload decoded on the CPU; codecs that can read it
        from their codes override it. PayloadError for an inconsistent payload.
        """
        return self.decode(payload) != 0

    def _checked(self, payload: Payload) -> Payload:
        """``payload`` with its sections as the codec wrote them, once its layout is checked.

        TypeError or PayloadError unless it is a payload of this codec with the section lengths
        the codec requires; the entropy stage is undone only after that check.
        """
        if not isinstance(payload, Payload):
            raise TypeError(f"decode takes a Payload, not {type(payload).__name__}")
        if payload.codec != self.name:
            raise PayloadError(f"payload was encoded by codec {payload.codec!r}, not {self.name!r}")
        if payload.params != self._params:
            raise PayloadError(
                f"payload parameters {payload.params} differ from this codec's {self._params}; "
                "decode it with decode_bytes or get_codec(payload.codec, **payload.params)"
            )
        self.check_sections(payload.shape, payload.dtype, payload.flags, payload.sections)
        return entropy.decode_payload(payload)

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate an input tensor; a flat view of it (a copy only if not contiguous)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"encode takes a torch.Tensor, not {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"unsupported dtype {x.dtype}; codecs take float32, float16 or bfloat16 tensors"
            )
        if x.layout != torch.strided:
            raise ValueError(f"encode takes dense tensors, got layout {x.layout}")
        if x.dim() > MAX_NDIM:
            raise ValueError(f"tensors with more than {MAX_NDIM} dimensions are not supported")
        if not shape_within_limits(tuple(x.shape)):
            raise ValueError(
                f"tensor of shape {tuple(x.shape)} is too large; the limit is {MAX_NUMEL} "
                "elements (dimensions of size 0 counted as 1)"
            )
        flat = x.detach().reshape(-1)
        if not self.checks_finite and flat.numel():
            lo, hi = torch.aminmax(flat)
            require_finite(self.name, lo, hi)
        return flat

    def check_sections(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        flags: int,
        sections: Sequence[bytes | memoryview],
    ) -> None:
        """``check_layout`` of sections as they travel: entropy-coded ones by the decoded
        lengths their frame headers declare (read without inflating anything)."""
        self.check_layout(shape, dtype, flags, entropy.declared_lengths(self._params, sections))

    def check_layout(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        flags: int,
        lengths: Sequence[int],
    ) -> None:
        """Raise PayloadError unless the section lengths are exactly what this codec needs."""
        if any(s < 0 for s in shape) or not shape_within_limits(tuple(shape)):
            raise PayloadError(f"unsupported shape {tuple(shape)}")
        if dtype not in SUPPORTED_DTYPES:
            raise PayloadError(f"unsupported dtype {dtype}")
        if flags & ~self.flag_mask:
            raise PayloadError(f"codec {self.name!r} defines no flag bits {flags:#x}")
        expected = self.expected_section_nbytes(tuple(shape), dtype, flags)
        if tuple(lengths) != expected:
            names = ", ".join(self.section_names)
            raise PayloadError(
                f"inconsistent section lengths {tuple(lengths)} ({names}); codec {self.name!r} "
                f"with shape {tuple(shape)} and dtype {dtype} needs {expected}"
            )

    # -- subclass hooks -------------------------------------------------------------------

    @abstractmethod
    def expected_section_nbytes(
        self, shape: tuple[int, ...], dtype: torch.dtype, flags: int
    ) -> tuple[int, ...]:
        """Exact byte length of each data section; PayloadError for impossible flags."""

    @abstractmethod
    def _encode(
        self,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None,
        train: bool,
        measure: bool,
    ) -> tuple[Payload, float | None]:
        """Encode a flat tensor in its own dtype, on its own device: the payload, and with
        ``measure`` the relative error the decoder will see (``||x - x_hat|| / ||x||``).

        The input is finite unless the codec sets ``checks_finite`` (then it calls
        ``require_finite``). With ``measure``, an error of None lets ``encode_measured`` decode
        the payload and measure it; without ``measure`` the error is ignored (None does).
        """

    @abstractmethod
    def _decode(self, payload: Payload, device: torch.device) -> torch.Tensor:
        """Decode a payload whose layout has been checked and whose sections are as the codec
        wrote them (entropy stage undone) into a flat tensor of ``numel`` values on ``device``.

        Any float dtype; ``decode`` casts it to the payload's dtype and shape.
        """

    def _payload(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        sections: Sequence[bytes],
        flags: int = 0,
    ) -> Payload:
        return Payload(
            codec=self.name,
            params=dict(self._params),
            shape=shape,
            dtype=dtype,
            sections=entropy.encode_sections(self._params, sections),  # entropy stage
            flags=flags,
        )


def _all_finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and expose +-Inf: one cheap reduction instead of isfinite().all().
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def require_finite(name: str, lo: torch.Tensor, hi: torch.Tensor) -> tuple[float, float]:
    """ValueError unless the input's min ``lo`` and max ``hi`` are finite; them as floats.

    One host sync for both values (NaN propagates into min and max, so this covers NaN too).
    """
    lo_f, hi_f = torch.stack([lo.float(), hi.float()]).tolist()
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise ValueError(
            f"codec {name!r} cannot encode NaN or Inf values (they have no meaningful "
            "top-k or quantization range); check the model for overflow"
        )
    return lo_f, hi_f


def check_finite(t: torch.Tensor, what: str) -> None:
    """PayloadError if a decoded tensor holds NaN or Inf (encoders never write them)."""
    if t.numel() and not _all_finite(t):
        raise PayloadError(f"{what} contain NaN or Inf")
