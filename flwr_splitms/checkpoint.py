"""Run state saved after every round, so that a stopped run continues where it stopped.

A checkpoint holds everything the next round depends on: the global client-side weights, the
server model and its optimizer state (momentum), the round number, the history so far, each
client's data cursor, the node-sampling RNG state and the run-config it belongs to. Clients
restart their momentum every round, so nothing else lives only on the nodes. Files are written
atomically (``checkpoint-round-NNNN.pt``) and only the newest ``keep`` are kept.

Size: the server weights and their SGD momentum, both float32, make almost all of it, so a
checkpoint is about twice the server half (ResNet18 shallow: 89.6 MB). Nothing in it is
redundant: the momentum is needed for a resumed run to equal the uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from flwr_splitms.storage import atomic_write_bytes

log = logging.getLogger("flwr")

CHECKPOINT_VERSION = 1
_NAME = re.compile(r"^checkpoint-round-(\d+)\.pt$")
# Keys that may differ between a run and its continuation.
RESUMABLE_KEYS = frozenset(
    {"resume", "num-server-rounds", "keep-checkpoints", "node-wait", "wait-factor", "wait-floor"}
)


@dataclass
class RunState:
    """What a run needs to continue after round ``server_round``."""

    server_round: int
    client_weights: dict[str, torch.Tensor]
    server_weights: dict[str, torch.Tensor]
    server_optimizer: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    cursors: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    sampler_state: Any = None
    run_config: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(folder: str | Path, server_round: int) -> Path:
    """Where the checkpoint of ``server_round`` goes."""
    return Path(folder).expanduser() / f"checkpoint-round-{server_round:04d}.pt"


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def _megabytes(value: Any) -> float:
    """MB of the tensors in ``value`` (nested dicts, lists and tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() / 1e6
    if isinstance(value, Mapping):
        return sum(_megabytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_megabytes(v) for v in value)
    return 0.0


def save_run_state(folder: str | Path, state: RunState, *, keep: int = 1) -> Path:
    """Write ``state`` atomically and delete all but the newest ``keep`` checkpoints.

    The first checkpoint in ``folder`` logs its size and what it holds, once per run.
    """
    if keep < 1:
        raise ValueError(f"keep-checkpoints must be >= 1, got {keep}")
    buffer = io.BytesIO()
    # not dataclasses.asdict: it would deep-copy every tensor before saving
    torch.save(
        {"version": CHECKPOINT_VERSION, **{f.name: getattr(state, f.name) for f in fields(state)}},
        buffer,
    )
    first = not _checkpoints(Path(folder).expanduser())
    path = atomic_write_bytes(checkpoint_path(folder, state.server_round), buffer.getvalue())
    if first:
        size = buffer.getbuffer().nbytes / 1e6
        log.info(
            "Checkpoint: %.1f MB per round (server weights %.1f MB, server momentum %.1f MB, "
            "client weights %.1f MB); keeping the newest %d (keep-checkpoints), about %.0f MB "
            "in %s",
            size,
            _megabytes(state.server_weights),
            _megabytes(state.server_optimizer),
            _megabytes(state.client_weights),
            keep,
            keep * size,
            path.parent,
        )
    for _, old in _checkpoints(path.parent)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_run_state(path: str | Path) -> RunState:
    """Read a checkpoint written by :func:`save_run_state`."""
    try:
        raw = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(raw, dict) or raw.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a flwr-splitms checkpoint of version {CHECKPOINT_VERSION}")
    raw.pop("version")
    return RunState(**raw)


def latest_run_state(folder: str | Path) -> RunState | None:
    """The newest checkpoint in ``folder``, or None when it has none."""
    found = _checkpoints(Path(folder).expanduser())
    return load_run_state(found[-1][1]) if found else None


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = RESUMABLE_KEYS
) -> list[str]:
    """Run-config keys whose values differ between a checkpoint and the run that resumes it."""
    skip = set(ignore)
    keys = sorted((set(saved) | set(current)) - skip)
    return [
        f"{key}: {saved.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
