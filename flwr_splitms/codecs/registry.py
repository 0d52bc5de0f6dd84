"""The codec registry: names and wire ids of the codecs, and ``get_codec``.

Kept apart from ``base`` so that the wire format (``payload``) can look codecs up by id
without importing the codec implementations it describes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import Codec

__all__ = ["codec_class", "codec_class_for_id", "codec_names", "get_codec", "register"]

_BY_NAME: dict[str, type[Codec]] = {}
_BY_ID: dict[int, type[Codec]] = {}

C = TypeVar("C", bound="type[Codec]")


def register(cls: C) -> C:
    """Class decorator: make a codec available to ``get_codec`` and to the wire format."""
    name, cid = cls.name, cls.codec_id
    if name in _BY_NAME or cid in _BY_ID:
        raise RuntimeError(f"codec name {name!r} or id {cid} registered twice")
    if not 0 <= cid <= 0xFF:
        raise RuntimeError(f"codec id {cid} does not fit in one byte")
    _BY_NAME[name] = cls
    _BY_ID[cid] = cls
    return cls


def codec_names() -> tuple[str, ...]:
    """Names of the registered codecs, in wire-id order (``none, qu, sp, rt, ms``)."""
    return tuple(_BY_ID[i].name for i in sorted(_BY_ID))


def codec_class(name: str) -> type[Codec]:
    """The codec class registered under ``name``; ValueError naming the choices otherwise."""
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(codec_names())}")
    return cls


def codec_class_for_id(codec_id: int) -> type[Codec] | None:
    """The codec class with wire id ``codec_id``, or None."""
    return _BY_ID.get(codec_id)


def get_codec(name: str, **params: object) -> Codec:
    """Build a codec: ``get_codec("ms", ratio=0.99, bits=2)``.

    Names: ``none``, ``qu``, ``sp``, ``rt``, ``ms``. Unknown names, unknown parameters and
    invalid values raise ValueError naming the problem and the valid choices.
    """
    return codec_class(name)(**params)
