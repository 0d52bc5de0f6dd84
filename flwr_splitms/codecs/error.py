"""Compression error as the paper measures it (Sec. 4.2, Fig. 2): relative 2-norm error."""

from __future__ import annotations

import math

import torch

__all__ = ["compression_error", "relative_error", "squared_norm"]


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


def relative_error(diff_sq: float, norm_sq: float) -> float:
    """``sqrt(diff_sq / norm_sq)`` with ``compression_error``'s edge cases (0.0 and ``inf``)."""
    if norm_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq) / math.sqrt(norm_sq)


def squared_norm(t: torch.Tensor) -> float:
    """``sum(t**2)`` of a float32 tensor on any device, to about 1e-7 relative.

    Squares in float32 summed by torch's cascade (CPU) or tree (GPU) reduction, instead of a
    float64 copy of the tensor; falls back to float64 when squares overflow or underflow.
    """
    if t.numel() == 0:
        return 0.0
    s = float((t * t).sum())
    if math.isfinite(s) and (s >= 1e-20 or (s == 0.0 and not bool(t.any()))):
        return s
    host = t.detach().to("cpu", torch.float64)
    return float(torch.dot(host.reshape(-1), host.reshape(-1)))
