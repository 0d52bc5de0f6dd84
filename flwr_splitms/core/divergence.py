"""The divergence guard: a run whose loss is not finite stops, one far above its start warns.

A learning rate too large for the batch makes SplitFed's loss explode within a few steps; the
history then fills with NaN or a loss that sits at many times its starting value while the
accuracy stays at chance. Both engines pass every step's loss through :class:`DivergenceGuard`,
so such a run stops (or warns) with the facts a user needs to fix it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

log = logging.getLogger("flwr")

FAR_ABOVE = 2.0
"""A round whose every step's loss exceeds this multiple of the run's first loss is far above."""


class DivergenceError(RuntimeError):
    """The training loss is no longer finite: the run stops (``flwr list`` shows it failed)."""


class DivergenceGuard:
    """Checks each step's loss against the run's first one.

    ``lr`` and ``batch_size`` are quoted in the messages; ``initial`` is the first step's loss
    (None until the first step; a resumed run passes its first round's mean).
    """

    def __init__(self, *, batch_size: int, initial: float | None = None) -> None:
        self.batch_size = batch_size
        self.initial = initial

    def _facts(self, server_round: int, step: int, lr: float) -> str:
        return f"round {server_round}, step {step + 1}, lr {lr:.4g}, batch-size {self.batch_size}"

    def check_steps(
        self, losses: Sequence[float], server_round: int, first_step: int, lr: float
    ) -> None:
        """Raise :class:`DivergenceError` (after one ERROR line) at the first non-finite loss."""
        for j, loss in enumerate(losses):
            if not math.isfinite(loss):
                facts = self._facts(server_round, first_step + j, lr)
                line = (
                    f"Training diverged: the loss is {loss} at {facts}. "
                    "Fix: lower lr (it is the rate at batch 64, scaled to batch-size by "
                    "lr-scaling), or raise warmup-steps"
                )
                log.error("%s", line)
                raise DivergenceError(line)
        if self.initial is None and losses:
            self.initial = float(losses[0])

    def check_error(self, err: Exception, server_round: int, step: int, lr: float) -> None:
        """An error from non-finite activations or gradients (codecs refuse NaN/Inf): divergence."""
        if "NaN or Inf" in str(err):
            line = (
                f"Training diverged: the activations or gradients hold NaN or Inf at "
                f"{self._facts(server_round, step, lr)}. Fix: lower lr, or raise warmup-steps"
            )
            log.error("%s", line)
            raise DivergenceError(line) from err

    def check_uploads(
        self, reasons: Sequence[str], sent: int, server_round: int, step: int, lr: float
    ) -> None:
        """Every client's activations hold NaN or Inf: the client halves diverged."""
        if sent and len(reasons) == sent and all("NaN or Inf" in r for r in reasons):
            line = (
                f"Training diverged: every client's activations hold NaN or Inf at "
                f"{self._facts(server_round, step, lr)}. Fix: lower lr, or raise warmup-steps"
            )
            log.error("%s", line)
            raise DivergenceError(line)

    def end_round(self, losses: Sequence[float], server_round: int, lr: float) -> bool:
        """Warn once for a round whose every loss stayed far above the first; True if it did."""
        if self.initial is None or not losses or min(losses) <= FAR_ABOVE * self.initial:
            return False
        log.warning(
            "The training loss stayed above %.3g (%gx the first step's %.3g) for all of round %d "
            "(lr %.4g, batch-size %d): the run may be diverging. Fix: lower lr, or raise "
            "warmup-steps",
            min(losses),
            FAR_ABOVE,
            self.initial,
            server_round,
            lr,
            self.batch_size,
        )
        return True
