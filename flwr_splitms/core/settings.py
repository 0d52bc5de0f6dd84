"""What the server tells the clients for one round: optimizer, data order, codecs, block size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr_splitms.core.schedule import warmup_factor


@dataclass(frozen=True)
class StepSettings:
    """The round settings every training message carries (the Flower form is in ``protocol``).

    ``codec_*`` is the uplink codec of the activations, ``grad_codec_*`` the downlink codec of the
    gradients; ``error_every`` = N measures the compression error on every N-th step only.
    ``lr`` is the round's rate (schedule and batch scaling applied); :meth:`lr_at` adds the
    run's warmup over its first ``warmup_steps`` steps. ``reestimate_bn``: at the round's end
    a client sets its BatchNorm statistics to those of its last batches under its final weights.
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
    warmup_steps: int = 0
    step_offset: int = 0  # steps the run took before this round (where the warmup stands)
    budget_bits: float = 0.0  # codec = "budget": no upload may exceed this many bits per element
    budget_fallback: str = ""  # ... else it is re-encoded with this fixed-size setting (a label)
    reestimate_bn: bool = False  # round end: BatchNorm statistics of the final weights

    def lr_at(self, step: int) -> float:
        """Learning rate of the round's ``step`` (0-based): ``lr`` after the run's warmup."""
        return self.lr * warmup_factor(self.step_offset + step, self.warmup_steps)

    def measures_error(self, step: int) -> bool:
        """Whether the compression error of ``step`` is measured."""
        return step % max(self.error_every, 1) == 0
