"""Datasets for split training: CIFAR-10/100, MNIST, Fashion-MNIST, ImageNet (ImageFolder), an
offline synthetic set, scikit-learn's 8x8 handwritten digits (real data inside its wheel, no
download), and the user's own ``torch.utils.data.Dataset``.

* Every dataset is a :class:`BatchSource`: size, labels, and ``batch(indices, augment=...,
  generator=...)``, which gives the same tensors again for a generator in the same state (the
  split protocol recomputes a batch's forward pass in a later message).
* :func:`from_torch_dataset` adapts any map-style ``Dataset`` of ``(input, label)`` pairs,
  replaying its random transforms exactly.
* :func:`load_dataset` and :func:`load_partition` cache per process, and on disk under
  ``<root>/.cache`` so that a fresh ClientApp process reads its partition instead of
  rebuilding it.
* Without internet (or without ``download``) a missing real dataset raises
  :class:`DatasetUnavailableError` with one line naming the root, the ``data-download`` flag and
  the offline ``dataset="synthetic"`` option.
"""

from .digits import DIGITS_TEST_SIZE, DIGITS_TRAIN_SIZE
from .images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_PADDING,
    IMAGENET_CROP,
    IMAGENET_MEAN,
    IMAGENET_RESIZE,
    IMAGENET_STD,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    BatchSource,
    DataSplit,
    ImageFolderDataset,
    ImageTensorDataset,
    Indices,
    Stats,
)
from .loading import (
    DATASETS,
    DEFAULT_ROOT,
    clear_cache,
    dataset_num_classes,
    load_dataset,
    load_labels,
    load_partition,
)
from .partition import PARTITION_SCHEMES, partition
from .sources import FASHION_MEAN, FASHION_STD, MNIST_MEAN, MNIST_STD, DatasetUnavailableError
from .torch_dataset import TorchDatasetSource, from_torch_dataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_PADDING",
    "DATASETS",
    "DEFAULT_ROOT",
    "DIGITS_TEST_SIZE",
    "DIGITS_TRAIN_SIZE",
    "FASHION_MEAN",
    "FASHION_STD",
    "IMAGENET_CROP",
    "IMAGENET_MEAN",
    "IMAGENET_RESIZE",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PARTITION_SCHEMES",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "BatchSource",
    "DataSplit",
    "DatasetUnavailableError",
    "ImageFolderDataset",
    "ImageTensorDataset",
    "Indices",
    "Stats",
    "TorchDatasetSource",
    "clear_cache",
    "dataset_num_classes",
    "from_torch_dataset",
    "load_dataset",
    "load_labels",
    "load_partition",
    "partition",
]
