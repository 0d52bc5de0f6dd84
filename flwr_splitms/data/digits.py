"""scikit-learn's 8x8 handwritten digits: a small real image set that needs no download.

``sklearn.datasets.load_digits`` reads the 1,797 images (10 classes, about 180 each; the test
part of the UCI "Optical Recognition of Handwritten Digits" set, Alpaydin and Kaynak 1998) from
a file inside the installed scikit-learn wheel, so a machine without internet can train on real
data. Each 8x8 image (gray levels 0-16) is upsampled bilinearly to 32x32 and copied to 3
channels, so the CIFAR networks and their cuts take it unchanged.

The train/test split is fixed (not the run's ``seed``): 30 images of every class, drawn with a
constant seed, are the 300 test images and the other 1,497 are the training set; every run,
seed and policy is evaluated on the same images. Both parts are normalised with the training
set's mean and standard deviation.
"""

from __future__ import annotations

import importlib.metadata
import logging

import numpy as np
import torch
import torch.nn.functional as F

from .images import ImageTensorDataset
from .sources import DatasetUnavailableError
from .synthetic import seed_for

__all__ = [
    "DIGITS_TEST_PER_CLASS",
    "DIGITS_TEST_SIZE",
    "DIGITS_TRAIN_SIZE",
    "digits_version",
    "load_sklearn_digits",
]

logger = logging.getLogger("flwr")

# Bump when the conversion below changes its output: the disk cache keys on it.
DIGITS_VERSION = 1
DIGITS_CLASSES, DIGITS_IMAGES = 10, 1797
DIGITS_TEST_PER_CLASS = 30
DIGITS_TEST_SIZE = DIGITS_CLASSES * DIGITS_TEST_PER_CLASS  # 300
DIGITS_TRAIN_SIZE = DIGITS_IMAGES - DIGITS_TEST_SIZE  # 1497
DIGITS_SIDE = 32  # the CIFAR models' input
_SPLIT_SEED = 0  # fixed: the test set does not depend on the run's seed
_GRAY_LEVELS = 16  # the 8x8 images count pixels of a 4x4 block of a 32x32 bitmap: 0..16

MISSING_SKLEARN = (
    'dataset="digits" needs scikit-learn, whose wheel ships the images (no download): '
    'pip install scikit-learn, or run offline with dataset="synthetic"'
)


def digits_version() -> str | None:
    """What the disk cache keys the digits on (scikit-learn's version and the conversion's),
    None when scikit-learn is not installed."""
    try:
        sklearn = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return f"scikit-learn-{sklearn}-conversion-{DIGITS_VERSION}"


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices: ``DIGITS_TEST_PER_CLASS`` seeded picks per class are test."""
    rng = np.random.default_rng(seed_for(_SPLIT_SEED, 6))
    test = []
    for c in range(DIGITS_CLASSES):
        members = np.flatnonzero(labels == c)
        if members.size <= DIGITS_TEST_PER_CLASS:
            raise DatasetUnavailableError(
                f"scikit-learn's digits have {members.size} images of class {c}, expected more "
                f"than {DIGITS_TEST_PER_CLASS}; reinstall scikit-learn (pip install scikit-learn)"
            )
        test.append(rng.choice(members, DIGITS_TEST_PER_CLASS, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(labels.size), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


def upsample(gray: np.ndarray) -> torch.Tensor:
    """``N x 8 x 8`` gray levels 0..16 -> uint8 ``N x 3 x 32 x 32`` (bilinear, 3 equal channels)."""
    x = torch.from_numpy(np.asarray(gray, dtype=np.float32) / _GRAY_LEVELS).unsqueeze(1)
    x = F.interpolate(x, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    # x 255, rounded: +0.5 then truncation by the uint8 cast (values are clamped >= 0)
    u8 = x.mul_(255.0).add_(0.5).clamp_(0.0, 255.49).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1).contiguous()


def load_sklearn_digits(train: bool) -> ImageTensorDataset:
    """The training (1,497 images) or test (300) part, as 3x32x32 uint8 in memory.

    Normalised with the training part's pixel mean and std (the same for both parts).
    Augmentation is the CIFAR random crop (padding 4) without the horizontal flip (a mirrored
    digit is not the same digit). Raises :class:`DatasetUnavailableError` naming
    ``pip install scikit-learn`` when scikit-learn is missing.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetUnavailableError(MISSING_SKLEARN) from exc
    bunch = load_digits()
    gray, labels = np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)
    if gray.shape != (DIGITS_IMAGES, 8, 8) or labels.shape != (DIGITS_IMAGES,):
        raise DatasetUnavailableError(
            f"scikit-learn's digits have shape {gray.shape}, expected ({DIGITS_IMAGES}, 8, 8); "
            "reinstall scikit-learn (pip install scikit-learn)"
        )
    train_idx, test_idx = split_indices(labels)
    images = upsample(gray)
    pixels = images[torch.from_numpy(train_idx), 0].to(torch.float64).div_(255.0)
    mean, std = float(pixels.mean()), float(pixels.std())
    own = train_idx if train else test_idx
    logger.info(
        "loaded digits (%s, %d images) from scikit-learn", "train" if train else "test", own.size
    )
    return ImageTensorDataset(
        images[torch.from_numpy(own)],
        torch.from_numpy(labels[own]),
        DIGITS_CLASSES,
        (mean, mean, mean),
        (std, std, std),
        name="digits",
        flip=False,
    )
