"""What the server tells the clients for one round: optimizer, data order, codecs, block size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepSettings:
    """The round settings every training message carries (the Flower form is in ``protocol``).

    ``codec_*`` is the uplink codec of the activations, ``grad_codec_*`` the downlink codec of the
    gradients; ``error_every`` = N measures the compression error on every N-th step only.
    """

    server_round: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    seed: int
    augment: bool
    codec_name: str
    codec_params: dict[str, Any] = field(default_factory=dict)
    grad_codec_name: str = "none"
    grad_codec_params: dict[str, Any] = field(default_factory=dict)
    error_every: int = 1

    def measures_error(self, step: int) -> bool:
        """Whether the compression error of ``step`` is measured."""
        return step % max(self.error_every, 1) == 0
