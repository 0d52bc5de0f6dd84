"""The two directions of the link for one set of round settings: uplink and downlink codecs.

Built once per distinct choice and shared by the client and the server half, so both sides
encode and decode with the same objects.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch

from flwr_splitms.codecs import Codec, Payload, PayloadError, get_codec
from flwr_splitms.codecs.dispatch import codec_of
from flwr_splitms.codecs.downlink import GradCodec, get_grad_codec, support_of
from flwr_splitms.core.settings import StepSettings


@dataclass(frozen=True)
class Link:
    """The uplink codec (activations) and the downlink codec (gradients)."""

    uplink: Codec
    downlink: GradCodec
    budgeted: bool = False  # an upload may come in a fallback setting (codec = "budget")

    def uplink_of(self, payload: Payload) -> Codec:
        """The codec to decode an upload with: the uplink's, or a budget fallback's."""
        if payload.codec == self.uplink.name and payload.params == self.uplink.params:
            return self.uplink
        if self.budgeted:
            return codec_of(payload)
        raise PayloadError(f"payload of codec {payload.codec!r}, expected {self.uplink.name!r}")

    def support(self, payload: Payload) -> torch.Tensor | None:
        """What the downlink codec needs to know of an uplink payload (mask reuse), else None."""
        return support_of(payload) if self.downlink.needs_support else None


_LINKS: dict[str, Link] = {}
_LOCK = threading.Lock()


def _spec(name: str, params: dict[str, Any]) -> str:
    return json.dumps([name, params], sort_keys=True, default=str)


def link_for(settings: StepSettings) -> Link:
    """The link of ``settings`` (cached per process)."""
    key = _spec(settings.codec_name, settings.codec_params) + _spec(
        settings.grad_codec_name, settings.grad_codec_params
    )
    key += "budgeted" if settings.budget_bits else ""
    with _LOCK:
        if key not in _LINKS:
            _LINKS[key] = Link(
                get_codec(settings.codec_name, **settings.codec_params),
                get_grad_codec(settings.grad_codec_name, **settings.grad_codec_params),
                budgeted=bool(settings.budget_bits),
            )
        return _LINKS[key]
