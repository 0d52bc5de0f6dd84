"""From a codec name, a payload or payload bytes to the codec that handles it.

``get_codec`` builds a codec by name; ``codec_of`` rebuilds the codec that wrote a payload;
``decode_bytes`` decodes payload bytes with the codec their header names. The bytes layout and
its checks are ``payload``'s; the entropy stage and the codec's own layout check run in
``Codec.check_sections`` and ``Codec.decode``.
"""

from __future__ import annotations

import torch

from .base import Codec
from .payload import Payload
from .registry import codec_class

__all__ = ["codec_of", "decode_bytes", "get_codec"]


def get_codec(name: str, **params: object) -> Codec:
    """Build a codec: ``get_codec("ms", ratio=0.99, bits=2)``.

    Names: ``none``, ``qu``, ``sp``, ``rt``, ``ms``, ``fp16``, ``bf16``. Unknown names, unknown
    parameters and invalid values raise ValueError naming the problem and the valid choices.
    """
    codec = codec_class(name)(**params)
    if not isinstance(codec, Codec):  # the registry knows codecs only as far as the wire goes
        raise TypeError(f"codec {name!r} is registered, but {type(codec).__name__} is no Codec")
    return codec


def codec_of(payload: Payload) -> Codec:
    """The codec that wrote ``payload``: ``get_codec(payload.codec, **payload.params)``."""
    if not isinstance(payload, Payload):
        raise TypeError(f"expected a Payload, not {type(payload).__name__}")
    return get_codec(payload.codec, **payload.params)


def decode_bytes(
    blob: bytes | bytearray | memoryview, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Decode payload bytes with the codec their header names (same shape and dtype).

    The result is on ``device`` (default: the CPU), where the decoding work also runs.
    """
    payload = Payload.from_bytes(blob)
    return codec_of(payload).decode(payload, device=device)
