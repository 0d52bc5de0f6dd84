"""Real datasets read through torchvision: CIFAR-10/100, MNIST, Fashion-MNIST, ImageNet.

Without internet (or without ``download``) a missing dataset raises
:class:`DatasetUnavailableError` with one line naming the root, the ``data-download`` flag and
the offline ``dataset="synthetic"`` option.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    ImageFolderDataset,
    ImageTensorDataset,
    Stats,
)
from .synthetic import seed_for

logger = logging.getLogger("flwr")

# Where torchvision keeps each dataset's files under the data root.
RAW_FOLDERS: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
    "mnist": ("MNIST", "raw"),
    "fashion-mnist": ("FashionMNIST", "raw"),
}

DIGIT_SIDE, DIGIT_PAD = 28, 2  # MNIST-style 28x28 images, zero-padded by 2 px to 32x32


def _padded_stats(mean: float, std: float) -> tuple[Stats, Stats]:
    """Mean/std of a 28x28 set's pixels after zero-padding to 32x32 (the zeros shift both)."""
    keep = DIGIT_SIDE**2 / (DIGIT_SIDE + 2 * DIGIT_PAD) ** 2
    m = mean * keep
    s = float(np.sqrt((std**2 + mean**2) * keep - m**2))
    return (m, m, m), (s, s, s)


# The usual 28x28 statistics (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530), padded.
MNIST_MEAN, MNIST_STD = _padded_stats(0.1307, 0.3081)
FASHION_MEAN, FASHION_STD = _padded_stats(0.2860, 0.3530)


class DatasetUnavailableError(RuntimeError):
    """A real dataset is not on disk and could not (or was not allowed to) be downloaded."""


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def unavailable_message(name: str, root: Path, download: bool, cause: BaseException | None) -> str:
    """The one line that says what is missing where, and the three ways out."""
    offline = 'or run offline with dataset="synthetic"'
    if name == "imagenet":
        return (
            f"imagenet not found under {root} (expected ImageFolder directories "
            f"{root / 'train'} and {root / 'val'}; it cannot be downloaded automatically): "
            f"place it there, {offline}"
        )
    if download:
        why = f": {_one_line(cause)}" if cause is not None else ""
        return (
            f"could not download {name} to {root} with download=True (run-config key "
            f"data-download){why}; fetch it into that root on a machine with internet, {offline}"
        )
    return (
        f"{name} not found (or incomplete) under {root} and download=False (run-config key "
        f"data-download); set data-download=true to fetch it, {offline}"
    )


def raw_fingerprint(name: str, root: Path) -> str | None:
    """A cheap version tag of a dataset's files on disk (names, sizes, mtimes), None if absent.

    The disk cache keys on it, so replacing the files invalidates what was derived from them.
    """
    folder = root.joinpath(*RAW_FOLDERS[name])
    try:
        stats = [(p.name, p.stat()) for p in folder.iterdir() if p.is_file()]
    except OSError:
        return None
    if not stats:
        return None
    entries = sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats)
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def load_cifar(name: str, root: Path, train: bool, download: bool) -> ImageTensorDataset:
    """CIFAR-10/100 from torchvision's files, as uint8 NCHW in memory."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=download)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise DatasetUnavailableError(unavailable_message(name, root, download, exc)) from exc
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    num_classes = 10 if name == "cifar10" else 100
    logger.info(
        "loaded %s (%s, %d images) from %s", name, "train" if train else "test", len(labels), root
    )
    return ImageTensorDataset(images, labels, num_classes, mean, std, name=name)


def load_digits(name: str, root: Path, train: bool, download: bool) -> ImageTensorDataset:
    """MNIST or Fashion-MNIST as 3x32x32 uint8: the gray 28x28 image zero-padded by 2 px on
    every side (no resampling, the digit keeps its pixels) and copied to 3 channels, so the
    CIFAR networks take it unchanged. Normalised with the padded images' statistics.

    Augmentation is the CIFAR random crop (padding 4); the horizontal flip is off for MNIST
    (a mirrored digit is not the same digit) and on for Fashion-MNIST.
    """
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        ds = cls(str(root), train=train, download=download)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise DatasetUnavailableError(unavailable_message(name, root, download, exc)) from exc
    gray = ds.data
    if gray.dtype != torch.uint8 or gray.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE):
        raise DatasetUnavailableError(
            unavailable_message(
                name, root, download, ValueError(f"unexpected images {tuple(gray.shape)}")
            )
        )
    padded = F.pad(gray, (DIGIT_PAD,) * 4).unsqueeze(1)
    images = padded.expand(-1, 3, -1, -1).contiguous()
    labels = ds.targets.to(torch.int64)
    mean, std = (MNIST_MEAN, MNIST_STD) if name == "mnist" else (FASHION_MEAN, FASHION_STD)
    logger.info(
        "loaded %s (%s, %d images) from %s", name, "train" if train else "test", len(labels), root
    )
    return ImageTensorDataset(images, labels, 10, mean, std, name=name, flip=name != "mnist")


def load_imagenet(
    root: Path, train: bool, subset_size: int | None, seed: int
) -> ImageFolderDataset:
    """ImageNet (or any ImageFolder tree) under ``root/train`` or ``root/val``."""
    folder = root / ("train" if train else "val")
    if not folder.is_dir():
        raise DatasetUnavailableError(unavailable_message("imagenet", root, False, None))
    try:
        ds = ImageFolderDataset(folder)
    except (OSError, RuntimeError) as exc:  # e.g. a folder with no images in it
        raise DatasetUnavailableError(unavailable_message("imagenet", root, False, exc)) from exc
    logger.info("indexed %d images of %d classes under %s", len(ds), ds.num_classes, folder)
    if subset_size is not None:
        ds = ds.select(subset(len(ds), subset_size, seed, "imagenet"))
    return ds


def subset(n: int, size: int, seed: int, name: str) -> np.ndarray:
    """A seeded random, sorted choice of ``size`` of ``n`` sample indices."""
    if size > n:
        raise ValueError(f"size={size} exceeds the {n} samples of {name}; pass size <= {n}")
    rng = np.random.default_rng(seed_for(seed, 3))
    return np.sort(rng.permutation(n)[:size])
