"""The codec registry: names and wire ids of the codecs, and their classes.

The bottom of the codec package's layering: it knows a codec only through
:class:`RegisteredCodec`, the part of ``base.Codec`` that the wire format uses, so that the
wire format (``payload``) can look codecs up by name and id without importing the codec
implementations it describes. ``get_codec`` (in ``dispatch``) builds a codec by name.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch

from .params import Param

__all__ = [
    "CodecClass",
    "RegisteredCodec",
    "codec_class",
    "codec_class_for_id",
    "codec_names",
    "register",
]


class RegisteredCodec(Protocol):
    """A codec as the wire format uses it; ``base.Codec`` implements it."""

    @property
    def params(self) -> dict[str, object]:
        """All parameters, defaults included."""

    def check_sections(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        flags: int,
        sections: Sequence[bytes | memoryview],
    ) -> None:
        """PayloadError unless the sections, as they travel, fit the codec's layout."""


class CodecClass(Protocol):
    """A codec class as the registry and the wire format use it (a ``base.Codec`` subclass)."""

    @property
    def name(self) -> str:
        """Name for ``get_codec``."""

    @property
    def codec_id(self) -> int:
        """Wire id, one byte."""

    @property
    def param_specs(self) -> tuple[Param, ...]:
        """The parameters, in wire order."""

    @property
    def param_struct(self) -> struct.Struct:
        """Wire layout of the parameters."""

    @property
    def section_names(self) -> tuple[str, ...]:
        """Names of the data sections, in wire order."""

    def __call__(self, **params: object) -> RegisteredCodec:
        """The codec with these parameters; ValueError for invalid ones."""


_BY_NAME: dict[str, CodecClass] = {}
_BY_ID: dict[int, CodecClass] = {}

C = TypeVar("C", bound=CodecClass)


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
    """Names of the registered codecs, in wire-id order (``none, qu, sp, rt, ms, ...``)."""
    return tuple(_BY_ID[i].name for i in sorted(_BY_ID))


def codec_class(name: str) -> CodecClass:
    """The codec class registered under ``name``; ValueError naming the choices otherwise."""
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(codec_names())}")
    return cls


def codec_class_for_id(codec_id: int) -> CodecClass | None:
    """The codec class with wire id ``codec_id``, or None."""
    return _BY_ID.get(codec_id)
