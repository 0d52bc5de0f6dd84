"""Splitting a training set's sample indices among clients: IID or Dirichlet label skew."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .synthetic import seed_for

__all__ = ["PARTITION_SCHEMES", "partition"]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet")


def positive_int(value: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def check_scheme(scheme: str, alpha: float) -> str:
    """The normalised scheme name; ``ValueError`` for an unknown scheme or a bad ``alpha``."""
    scheme_key = str(scheme).strip().lower()
    if scheme_key not in PARTITION_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {', '.join(PARTITION_SCHEMES)}")
    if scheme_key == "dirichlet" and not (
        isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0
    ):
        raise ValueError(f"alpha must be a finite number > 0 (e.g. 0.5), got {alpha!r}")
    return scheme_key


def partition(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` disjoint, covering, sorted int64 arrays.

    ``"iid"``: a seeded shuffle cut into near-equal parts. ``"dirichlet"``: for every class, its
    samples are divided by proportions drawn from Dirichlet(``alpha``) (small alpha = more
    label skew); every partition gets at least one sample. Deterministic in ``seed``.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError("labels must be a 1-D array of integer class labels")
    positive_int(num_partitions, "num_partitions")
    k, n = int(num_partitions), int(y.size)
    if k > n:
        raise ValueError(
            f"num_partitions={k} exceeds the {n} samples; use at most {n} partitions or more data"
        )
    scheme_key = check_scheme(scheme, alpha)
    rng = np.random.default_rng(seed_for(seed, 4))
    if scheme_key == "iid":
        parts = np.array_split(rng.permutation(n), k)
    else:
        parts = _dirichlet(y, k, float(alpha), rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per-class Dirichlet split; retries, then moves single samples, so no part is empty."""
    classes = np.unique(y)
    parts: list[list[np.ndarray]] = []
    for _ in range(20):
        parts = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * idx.size).astype(int)
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
        if all(sum(p.size for p in part) > 0 for part in parts):
            break
    out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    for j in range(k):  # last resort: give each empty part one sample of the largest part
        if out[j].size == 0:
            big = int(np.argmax([o.size for o in out]))
            out[j], out[big] = out[big][-1:], out[big][:-1]
    return out
