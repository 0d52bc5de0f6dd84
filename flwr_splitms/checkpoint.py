"""Run state saved after every round, so that a stopped run continues where it stopped.

A checkpoint holds everything the next round depends on: the global client-side weights, the
server model and its optimizer state (momentum), the round number, the history so far, each
client's data cursor, the node-sampling RNG state and the run-config it belongs to. Clients
restart their momentum every round, so nothing else lives only on the nodes. Files are written
atomically (``checkpoint-round-NNNN.pt``) and only the newest ``keep`` are kept.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flwr_splitms.storage import atomic_write_bytes

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


def save_run_state(folder: str | Path, state: RunState, *, keep: int = 2) -> Path:
    """Write ``state`` atomically and delete all but the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep-checkpoints must be >= 1, got {keep}")
    buffer = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **asdict(state)}, buffer)
    path = atomic_write_bytes(checkpoint_path(folder, state.server_round), buffer.getvalue())
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
