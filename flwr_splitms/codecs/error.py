"""Compression error as the paper measures it (Sec. 4.2, Fig. 2): relative 2-norm error."""

from __future__ import annotations

import math

import torch

__all__ = ["compression_error"]


def compression_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``||x - x_hat||_2 / ||x||_2`` over all elements, computed in float64 on the CPU.

    0.0 when both are zero (or empty); ``inf`` when only ``x`` is zero.
    """
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    a = x.detach().to("cpu", torch.float64)
    b = x_hat.detach().to("cpu", torch.float64)
    diff = float(torch.linalg.vector_norm(a - b))
    norm = float(torch.linalg.vector_norm(a))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm
