"""The offline stand-in for CIFAR: a learnable synthetic image set, deterministic from a seed."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from .images import SYNTHETIC_MEAN, SYNTHETIC_STD, ImageTensorDataset, crop

logger = logging.getLogger("flwr")

# Bump when the generator below changes its output: the disk cache keys on it.
SYNTHETIC_VERSION = 1


def seed_for(*key: int) -> int:
    """A well-mixed 32-bit seed for a tuple of integers (distinct streams from one user seed)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(1)[0])


def _label_stream(
    num_classes: int, size: int, seed: int, train: bool
) -> tuple[torch.Tensor, torch.Generator]:
    """The labels of the synthetic set and the generator that then draws its images."""
    g = torch.Generator().manual_seed(seed_for(seed, 1 if train else 2))
    labels = torch.arange(size, dtype=torch.int64) % num_classes
    return labels[torch.randperm(size, generator=g)], g


def synthetic_labels(num_classes: int, size: int, seed: int, train: bool) -> torch.Tensor:
    """The labels :func:`generate_synthetic` gives, without drawing a single image."""
    return _label_stream(num_classes, size, seed, train)[0]


def generate_synthetic(num_classes: int, size: int, seed: int, train: bool) -> ImageTensorDataset:
    """A learnable CIFAR-shaped (3x32x32) stand-in, deterministic from ``seed``.

    Each class has a smooth random colour pattern (its prototype, drawn from ``seed`` alone, so
    train and test share it). A sample is its class prototype, shifted by up to 8 px, mirrored
    with probability 1/2 and scaled by a random contrast, on top of a smooth random background
    (one of a bank of 1024, also shifted), plus uniform pixel noise. Train and test draw samples
    from different random streams of the same seed. 50,000 images take a few seconds.
    """
    # Shifts of up to 8 px keep it from being linearly separable (a ridge classifier on raw
    # pixels gets ~70% on 10 classes) while a small CNN reaches ~80% in a few hundred steps.
    pad, bank_size = 8, 1024
    side = 32 + 2 * pad

    def smooth(n: int, grid: int, g: torch.Generator) -> torch.Tensor:
        low = torch.randn(n, 3, grid, grid, generator=g)
        x = F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
        return x / x.std(dim=(1, 2, 3), keepdim=True)

    g = torch.Generator().manual_seed(seed_for(seed, 0))
    protos = smooth(num_classes, 6, g)
    protos = torch.cat([protos, protos.flip(-1)])  # index c + num_classes = mirrored class c
    background = smooth(bank_size, 4, g)

    labels, g = _label_stream(num_classes, size, seed, train)
    images = torch.empty(size, 3, 32, 32, dtype=torch.uint8)
    chunk = 8192
    for start in range(0, size, chunk):
        y = labels[start : start + chunk]
        n = y.shape[0]
        mirrored = torch.randint(0, 2, (n,), generator=g) * num_classes
        shift = torch.randint(0, 2 * pad + 1, (4, n), generator=g)
        x = crop(protos, y + mirrored, shift[0], shift[1], 32, 32)
        x.mul_(0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g))
        bg = torch.randint(0, bank_size, (n,), generator=g)
        x.add_(crop(background, bg, shift[2], shift[3], 32, 32), alpha=0.8)
        x.add_(torch.rand(n, 3, 32, 32, generator=g).sub_(0.5), alpha=1.7)  # std ~0.5
        # 128 + 40 x, rounded: +0.5 then truncation by the uint8 cast (values are clamped >= 0)
        images[start : start + n] = x.mul_(40.0).add_(128.5).clamp_(0.0, 255.49)
    logger.info("generated %d synthetic images of %d classes (seed %d)", size, num_classes, seed)
    return ImageTensorDataset(
        images, labels, num_classes, SYNTHETIC_MEAN, SYNTHETIC_STD, name="synthetic"
    )
