"""The gradient side of the split link: how the server's gradient travels back to a client.

The paper compresses only the uplink (the cut-layer activations) and returns the gradient
w.r.t. the decoded activations as raw float32, so with MS at 0.99/2 bits the uplink shrinks
about 14x but uplink + downlink only about 1.9x. SplitFC (Oh et al., arXiv 2307.10805) also
compresses the downlink. Here a :class:`GradCodec` turns a gradient into bytes and back:

=========  ======================================================  =======================
name       what travels                                            bytes (4-d, float32)
=========  ======================================================  =======================
``none``   the raw gradient (the paper's choice)                   52 + 4*d
``fp16``   every value as IEEE binary16 (``halfprec``)             52 + 2*d
``bf16``   every value as bfloat16 (``halfprec``)                  52 + 2*d
``mask``   the values at the uplink support only, no positions     28 + 4*k (2*k in 16 bit)
``qu``,    any registered codec applied to the gradient, with its  as for activations
``sp``...  parameters (``get_grad_codec("ms", ratio=0.9)``)        (``payload`` docstring)
=========  ======================================================  =======================

(d = elements of the activation, k = its support size; the constant is the payload header.)

**Mask reuse** (``mask``). Both ends already know where MS sent something: the client from the
payload it encoded, the server from the payload it received; :func:`support_of` reads the same
bits from both. The server sends the gradient only at those positions, in row-major order, with
no index bytes; every other position decodes to 0.

Why this is exact where the cut ends in a ReLU and the activation is 0: the gradient w.r.t. the
cut activation a = ReLU(z) is *not* zero there in general (the server's loss does depend on
a). But the client back-propagates through its ReLU, multiplying by ReLU'(z) = 1[z > 0], which is
0 where z <= 0, i.e. wherever a = 0 (PyTorch's ReLU has derivative 0 at 0). The gradient at those
positions is discarded by the client's own backward pass, so dropping it changes no client
parameter gradient, bit for bit (``tests/test_codecs_downlink.py`` checks this).

What it drops elsewhere: MS code 0 also covers small *positive* activations,
0 < a < Top_min / (2 (2^b - 1)) with nearest rounding (Top_min / (2^b - 1) with floor), where
ReLU' = 1; their gradient is lost. The client's update is then the gradient of the server's
loss with those activations held constant (a stop-gradient on them). At MS 0.99/2 bits that is
a large part of the positions: on ResNet18 trained 20 steps on the synthetic set, 37-40% of
the cut activations are ReLU zeros and another 25-35% small positives with code 0, and the
client's parameter gradients differ from the full-gradient ones by 28% (shallow cut) to 45%
(deep) in relative 2-norm, while ``ms`` at 0.9/4 bits on the whole gradient stays within
0.8-1.5% and ``fp16`` within 0.05% (``benchmarks/entropy_stage.py``). Without a ReLU at the
cut (signed MS), every code-0 position is an approximation.

Wire form: every GradCodec blob is a :class:`Payload` (``payload.to_bytes()``), so
``Payload.from_bytes`` refuses garbage with :class:`PayloadError` before allocating. A ``mask``
blob is the payload of the 1-d vector of support values, encoded by ``none``, ``fp16`` or
``bf16`` (param ``values``); decoding checks the codec, its parameters and that the vector has
exactly as many values as the receiver's support has positions.

Support for other uplink codecs: :func:`support_of` asks the payload's codec
(``Codec.support``), whose default decodes the payload on the CPU and takes the nonzero
positions (``sp``/``rt``: the kept positions holding nonzero values; ``qu``: codes that decode
to nonzero; ``none``: the nonzero activations, which makes ``mask`` exact on a ReLU cut). Both
ends run the same decoder on the same bytes, so they agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from .base import Codec
from .dispatch import codec_of, get_codec
from .params import Choice, Param
from .payload import Payload, PayloadError
from .registry import codec_names

__all__ = [
    "GradCodec",
    "MaskGradCodec",
    "PayloadGradCodec",
    "get_grad_codec",
    "grad_codec_names",
    "support_of",
]

MASK = "mask"


class GradCodec(ABC):
    """Encodes the gradient w.r.t. the cut activations into bytes, and back.

    ``needs_support``: whether :meth:`encode` and :meth:`decode` need ``support``, the bool
    mask :func:`support_of` computes from the uplink payload of the same batch (both ends must
    pass the mask of the same payload). Codecs that do not need it ignore it.
    """

    name: str
    needs_support: ClassVar[bool] = False

    @property
    @abstractmethod
    def params(self) -> dict[str, object]:
        """All parameters: ``get_grad_codec(c.name, **c.params)`` rebuilds ``c``."""

    @abstractmethod
    def encode(
        self,
        grad: torch.Tensor,
        *,
        support: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> bytes:
        """The bytes to send for ``grad`` (float32/float16/bfloat16, any device, finite).

        ``generator`` drives randomized codecs (``rt``). ``len(result)`` is the downlink cost.
        """

    @abstractmethod
    def decode(
        self,
        blob: bytes | bytearray | memoryview,
        *,
        support: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The gradient from ``blob``, in the dtype it was encoded from, on ``device`` (CPU).

        ``shape``, when given, is the shape the receiver expects (its activations'); a blob of
        another shape raises PayloadError, as does any malformed or foreign blob.
        """

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"get_grad_codec({self.name!r}{args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GradCodec):
            return NotImplemented
        return self.name == other.name and self.params == other.params

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params.items())))


def _check_shape(got: tuple[int, ...], shape: Sequence[int] | None) -> None:
    if shape is not None and got != tuple(int(s) for s in shape):
        raise PayloadError(
            f"gradient of shape {got} does not match the expected shape {tuple(shape)}"
        )


class PayloadGradCodec(GradCodec):
    """A registered activation codec applied to the whole gradient (``none``, ``fp16``, ...)."""

    needs_support = False

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.name = codec.name

    @property
    def params(self) -> dict[str, object]:
        return self.codec.params

    def encode(
        self,
        grad: torch.Tensor,
        *,
        support: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> bytes:
        return self.codec.encode(grad, generator=generator).to_bytes()

    def decode(
        self,
        blob: bytes | bytearray | memoryview,
        *,
        support: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        payload = Payload.from_bytes(blob)
        _check_shape(payload.shape, shape)
        return self.codec.decode(payload, device=device)


VALUES = Choice("values", "none", ("none", "fp16", "bf16"))


class MaskGradCodec(GradCodec):
    """Mask reuse: the gradient at the uplink support only, no index bytes.

    Param ``values``: the codec of the support values, ``"none"`` (the gradient's dtype,
    default), ``"fp16"`` or ``"bf16"`` (2 bytes each).
    """

    name = MASK
    needs_support = True
    param_specs: ClassVar[tuple[Param, ...]] = (VALUES,)

    def __init__(self, *, values: object = VALUES.default) -> None:
        self._values = str(VALUES.validate(values))
        self._inner = get_codec(self._values)

    @property
    def params(self) -> dict[str, object]:
        return {"values": self._values}

    @staticmethod
    def _support(support: torch.Tensor | None, what: str) -> torch.Tensor:
        if support is None:
            raise ValueError(
                f"grad codec 'mask' needs support= to {what}: the bool mask "
                "support_of(payload) of the uplink payload of the same batch"
            )
        if not isinstance(support, torch.Tensor) or support.dtype != torch.bool:
            raise ValueError("support must be a bool tensor, as support_of(payload) returns")
        return support

    def encode(
        self,
        grad: torch.Tensor,
        *,
        support: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> bytes:
        mask = self._support(support, "encode")
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"encode takes a torch.Tensor, not {type(grad).__name__}")
        if tuple(grad.shape) != tuple(mask.shape):
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} does not match the support of shape "
                f"{tuple(mask.shape)}; pass support_of() of this batch's uplink payload"
            )
        values = grad.detach()[mask.to(grad.device)]  # row-major order of the positions
        return self._inner.encode(values).to_bytes()

    def decode(
        self,
        blob: bytes | bytearray | memoryview,
        *,
        support: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        mask = self._support(support, "decode")
        _check_shape(tuple(mask.shape), shape)
        payload = Payload.from_bytes(blob)
        k = int(mask.sum())
        if payload.shape != (k,):
            raise PayloadError(
                f"mask-reuse gradient holds values of shape {payload.shape}, the support has "
                f"{k} positions; client and server must use the support of the same payload"
            )
        values = self._inner.decode(payload, device=device)
        mask = mask.to(values.device)
        out = torch.zeros(mask.shape, dtype=payload.dtype, device=values.device)
        out[mask] = values
        return out


def grad_codec_names() -> tuple[str, ...]:
    """Names ``get_grad_codec`` takes: the registered codecs, then ``mask``."""
    return (*codec_names(), MASK)


def get_grad_codec(name: str, **params: object) -> GradCodec:
    """Build a downlink codec: ``get_grad_codec("mask", values="fp16")``,
    ``get_grad_codec("ms", ratio=0.9, bits=4)``, ``get_grad_codec("none")`` (the paper).

    Unknown names, parameters or values raise ValueError naming the valid choices.
    """
    if name == MASK:
        unknown = sorted(set(params) - {s.name for s in MaskGradCodec.param_specs})
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for grad codec 'mask'; valid: values"
            )
        return MaskGradCodec(**params)
    if not isinstance(name, str) or name not in codec_names():
        raise ValueError(
            f"unknown grad codec {name!r}; choose one of {', '.join(grad_codec_names())}"
        )
    return PayloadGradCodec(get_codec(name, **params))


def support_of(payload: Payload) -> torch.Tensor:
    """Bool mask, shape of the activations: where the uplink payload sent something.

    The payload's codec says (``Codec.support``). ``ms``: positions whose magnitude code (sign
    bit ignored) is not 0, i.e. the kept values and the nonzero quantized codes; read from the
    codes, so it is exact integer work and the client (on the payload it encoded) and the
    server (on the payload it received) get the same mask bit for bit. Other codecs: the
    nonzero entries of the payload decoded on the CPU. Raises PayloadError for an inconsistent
    payload.
    """
    if not isinstance(payload, Payload):
        raise TypeError(f"support_of takes a Payload, not {type(payload).__name__}")
    return codec_of(payload).support(payload)
