"""Round accounting: traffic, time, losses and errors of one round, as one history row."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flwr_splitms.core.server_half import ClientUpload

log = logging.getLogger("flwr")


@dataclass
class RoundAccumulator:
    """Collects what one round cost and produced; :meth:`row` is its history row."""

    server_round: int
    lr: float
    num_clients: int = 0
    uplink_bytes: float = 0.0
    uplink_raw_bytes: float = 0.0
    downlink_bytes: float = 0.0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    message_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def uplink(self, upload: ClientUpload) -> None:
        """A client's upload: bytes sent, bytes the raw activations would take, measured errors."""
        self.uplink_bytes += sum(len(blob) for blob in upload.blobs)
        self.uplink_raw_bytes += upload.raw_nbytes
        self.errors.extend(upload.errors)

    def downlink(self, blobs: Sequence[bytes]) -> None:
        """Gradient bytes sent to a client."""
        self.downlink_bytes += sum(len(blob) for blob in blobs)

    def row(self) -> dict[str, float]:
        """The history row of the round (evaluation columns are added by the engine)."""
        measured = [e for e in self.errors if not math.isnan(e)]
        return {
            "round": self.server_round,
            "train_loss": float(np.mean(self.losses)) if self.losses else math.nan,
            "compression_error": float(np.mean(measured)) if measured else math.nan,
            "uplink_bytes": self.uplink_bytes,
            "uplink_raw_bytes": self.uplink_raw_bytes,
            "downlink_bytes": self.downlink_bytes,
            "total_bytes": self.uplink_bytes + self.downlink_bytes,
            "client_seconds": self.client_seconds,
            "server_seconds": self.server_seconds,
            "message_seconds": self.message_seconds,
            "lr": self.lr,
            "steps": len(self.losses),
            "num_clients": self.num_clients,
            "round_seconds": time.perf_counter() - self.started,
        }


def log_round(row: dict[str, float], num_rounds: int, engine: str = "ROUND") -> None:
    """The one log line per round that both engines print."""
    accuracy = row.get("test_accuracy", math.nan)
    log.info(
        "[%s %d/%d] train loss %.4f | test acc %s | uplink %.2f MB (raw %.2f MB) | "
        "downlink %.2f MB | %d clients, %d steps, %.1fs",
        engine,
        int(row["round"]),
        num_rounds,
        row.get("train_loss", math.nan),
        "n/a" if accuracy is None or math.isnan(accuracy) else f"{100 * accuracy:.2f}%",
        row.get("uplink_bytes", 0.0) / 1e6,
        row.get("uplink_raw_bytes", 0.0) / 1e6,
        row.get("downlink_bytes", 0.0) / 1e6,
        int(row.get("num_clients", 0)),
        int(row.get("steps", 0)),
        row.get("round_seconds", 0.0),
    )


class StepProgress:
    """Logs a progress line about every ``interval`` seconds during a long round.

    With ``server_round`` and ``num_rounds`` the line names the round and says what is left of
    the round and of the run: ``round 2/5: step 40/100, loss 2.1034, about 50s left in the
    round, about 6m left in the run``. The round's rest comes from its step rate so far; each
    later round is taken to last as long as the rounds this process finished took on average
    (from ``run_started``, the ``time.monotonic()`` at which round ``first_round`` began), or,
    before any finished, as long as this round will. ``label`` prefixes the line (``[local]``).
    """

    def __init__(
        self,
        label: str,
        total: int,
        interval: float = 30.0,
        *,
        server_round: int | None = None,
        num_rounds: int | None = None,
        run_started: float | None = None,
        first_round: int = 1,
    ) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.server_round, self.num_rounds = server_round, num_rounds
        self.run_started, self.first_round = run_started, first_round
        self.started = self.last = time.monotonic()

    def update(self, step: int, loss: float) -> None:
        """Report step ``step`` (1-based) if the interval has passed."""
        now = time.monotonic()
        if now - self.last >= self.interval and step < self.total:
            self.last = now
            round_left = (self.total - step) * (now - self.started) / step
            line = f"{self._prefix()}: step {step}/{self.total}, loss {loss:.4f}, "
            line += f"about {self.duration(round_left)} left in the round"
            run_left = self._run_left(now, round_left)
            if run_left is not None:
                line += f", about {self.duration(run_left)} left in the run"
            log.info("%s", line)

    @staticmethod
    def duration(seconds: float) -> str:
        """A rough duration for a progress line: ``45s``, ``6m``, ``2h 05m``."""
        if seconds < 99.5:
            return f"{seconds:.0f}s"
        minutes = round(seconds / 60)
        if minutes < 100:
            return f"{minutes}m"
        return f"{minutes // 60}h {minutes % 60:02d}m"

    def _prefix(self) -> str:
        if self.server_round is None:
            return self.label
        of = f"/{self.num_rounds}" if self.num_rounds is not None else ""
        return f"{self.label} round {self.server_round}{of}".strip()

    def _run_left(self, now: float, round_left: float) -> float | None:
        """Seconds left in the run, or None without the round and the number of rounds."""
        if self.server_round is None or self.num_rounds is None:
            return None
        finished = self.server_round - self.first_round
        if self.run_started is not None and finished > 0:
            per_round = (self.started - self.run_started) / finished
        else:
            per_round = now - self.started + round_left
        return round_left + max(self.num_rounds - self.server_round, 0) * per_round
