"""The ``Codec`` interface shared by all compression schemes.

``Codec.encode`` validates the input once (a finite float32/float16/bfloat16 tensor of any
shape, on any device) and hands a flat CPU view to the codec's ``_encode``; ``Codec.decode``
checks that the payload belongs to this codec and that its section lengths are exactly what
the codec requires, before the codec's ``_decode`` touches the data.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from .dtypes import SUPPORTED_DTYPES
from .params import Param
from .payload import MAX_NDIM, MAX_NUMEL, Payload, PayloadError, shape_within_limits

__all__ = ["Codec", "check_finite"]


class Codec(ABC):
    """A lossy (or lossless) tensor compressor with a real, byte-exact wire form.

    Subclasses set ``name``, ``codec_id``, ``param_specs`` and ``section_names`` and implement
    ``expected_section_nbytes``, ``_encode`` and ``_decode``.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    param_specs: ClassVar[tuple[Param, ...]] = ()
    section_names: ClassVar[tuple[str, ...]]
    flag_mask: ClassVar[int] = 0
    param_struct: ClassVar[struct.Struct]

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

        ``generator`` (a CPU ``torch.Generator``) drives the randomness of ``rt``; None uses
        torch's global RNG. ``train=False`` makes ``rt`` plain Top-k. Other codecs ignore both.
        """
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
        flat = x.detach().to("cpu").reshape(-1)
        if flat.numel() and not _all_finite(flat):
            raise ValueError(
                f"codec {self.name!r} cannot encode NaN or Inf values (they have no meaningful "
                "top-k or quantization range); check the model for overflow"
            )
        return self._encode(flat, tuple(x.shape), generator=generator, train=train)

    def decode(self, payload: Payload) -> torch.Tensor:
        """Reconstruct the tensor: same shape and dtype as the encoded one, on the CPU."""
        if not isinstance(payload, Payload):
            raise TypeError(f"decode takes a Payload, not {type(payload).__name__}")
        if payload.codec != self.name:
            raise PayloadError(f"payload was encoded by codec {payload.codec!r}, not {self.name!r}")
        if payload.params != self._params:
            raise PayloadError(
                f"payload parameters {payload.params} differ from this codec's {self._params}; "
                "decode it with decode_bytes or get_codec(payload.codec, **payload.params)"
            )
        self.check_layout(
            payload.shape, payload.dtype, payload.flags, [len(s) for s in payload.sections]
        )
        flat = self._decode(payload)
        return flat.to(payload.dtype).reshape(payload.shape)

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
    ) -> Payload:
        """Encode a flat, finite CPU tensor in its own dtype."""

    @abstractmethod
    def _decode(self, payload: Payload) -> torch.Tensor:
        """Decode a payload whose layout has been checked into a flat tensor of ``numel``."""

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
            sections=tuple(sections),
            flags=flags,
        )


def _all_finite(t: torch.Tensor) -> bool:
    # min and max propagate NaN and expose +-Inf: one cheap reduction instead of isfinite().all().
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def check_finite(t: torch.Tensor, what: str) -> None:
    """PayloadError if a decoded tensor holds NaN or Inf (encoders never write them)."""
    if t.numel() and not _all_finite(t):
        raise PayloadError(f"{what} contain NaN or Inf")
