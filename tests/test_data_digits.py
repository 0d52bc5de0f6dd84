"""dataset="digits": scikit-learn's 8x8 handwritten digits, upsampled to 3x32x32, no download."""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flwr_splitms import data
from flwr_splitms.config import ConfigError, SplitConfig
from flwr_splitms.data import (
    DATASETS,
    DIGITS_TEST_SIZE,
    DIGITS_TRAIN_SIZE,
    DatasetUnavailableError,
    ImageTensorDataset,
    dataset_num_classes,
    digits,
    load_dataset,
    load_partition,
)
from flwr_splitms.data import disk_cache as store
from flwr_splitms.experiment import client_data, evaluation_data, num_classes
from flwr_splitms.models import ARCHS, split_model
from flwr_splitms.models.split import input_shape

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(autouse=True)
def _isolated_cache() -> Iterator[None]:
    data.clear_cache()
    yield
    data.clear_cache()


def _load(train: bool = True, **kwargs: Any) -> ImageTensorDataset:
    ds = load_dataset("digits", train=train, **kwargs)
    assert isinstance(ds, ImageTensorDataset)
    return ds


def _raw() -> tuple[np.ndarray, np.ndarray]:
    bunch = sklearn_datasets.load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


# ----------------------------------------------------------------------------- the data set


def test_registered_with_ten_classes() -> None:
    assert "digits" in DATASETS
    assert dataset_num_classes("digits") == dataset_num_classes("DIGITS", 10) == 10
    with pytest.raises(ValueError, match="10 classes"):
        dataset_num_classes("digits", 100)


def test_shapes_sizes_and_classes() -> None:
    train, test = _load(True), _load(False)
    assert (len(train), len(test)) == (DIGITS_TRAIN_SIZE, DIGITS_TEST_SIZE) == (1497, 300)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32)
        assert ds.labels.dtype == torch.int64 and ds.num_classes == 10 and ds.name == "digits"
        assert torch.equal(ds.images[:, 0], ds.images[:, 1])  # gray, repeated to 3 channels
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])
        assert not ds.flip  # a mirrored digit is another symbol
    assert torch.bincount(test.labels, minlength=10).tolist() == [30] * 10  # stratified
    _, labels = _raw()
    full = np.bincount(labels, minlength=10)
    assert torch.bincount(train.labels, minlength=10).tolist() == (full - 30).tolist()


def test_split_is_disjoint_covering_and_matches_scikit_learn() -> None:
    gray, labels = _raw()
    train_idx, test_idx = digits.split_indices(labels)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(labels.size))
    train, test = _load(True), _load(False)
    images = digits.upsample(gray)
    assert torch.equal(train.images, images[train_idx]) and torch.equal(
        test.images, images[test_idx]
    )
    assert train.labels.tolist() == labels[train_idx].tolist()
    assert test.labels.tolist() == labels[test_idx].tolist()


def test_upsampling_keeps_levels_and_positions() -> None:
    flat = np.full((2, 8, 8), 16.0)
    flat[1] = 8.0
    up = digits.upsample(flat)
    assert up.shape == (2, 3, 32, 32)
    assert bool((up[0] == 255).all()) and bool((up[1] == 128).all())  # 8/16 * 255, rounded
    dot = np.zeros((1, 8, 8))
    dot[0, 2, 5] = 16.0  # one pixel: its 4x4 block in the 32x32 image is the brightest
    up = digits.upsample(dot)[0, 0].float()
    rows, cols = up.sum(1), up.sum(0)
    assert 8 <= int(rows.argmax()) <= 11 and 20 <= int(cols.argmax()) <= 23
    assert float(up[:4].sum()) == 0.0 and float(up[:, :16].sum()) == 0.0  # far pixels stay dark


def test_deterministic_and_independent_of_the_run_seed() -> None:
    first = _load(True, seed=0)
    data.clear_cache()
    again = _load(True, seed=7)
    assert first is not again
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.mean == again.mean and first.std == again.std
    test_a = _load(False, seed=1)
    data.clear_cache()
    assert torch.equal(test_a.labels, _load(False, seed=2).labels)


def test_normalised_with_the_training_sets_statistics() -> None:
    train, test = _load(True), _load(False)
    assert train.mean == test.mean and train.std == test.std
    assert len(set(train.mean)) == 1 and len(set(train.std)) == 1
    x, y = train.batch(range(len(train)))
    assert x.shape == (1497, 3, 32, 32) and y.shape == (1497,)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    xt, _ = test.batch(range(len(test)))
    assert abs(float(xt.mean())) < 0.1 and abs(float(xt.std()) - 1.0) < 0.1  # same statistics


def test_augmentation_replays_from_the_generator_and_never_flips() -> None:
    train = _load(True)
    a, _ = train.batch([0, 5, 9], augment=True, generator=torch.Generator().manual_seed(4))
    b, _ = train.batch([0, 5, 9], augment=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    plain, _ = train.batch([0, 5, 9])
    assert not torch.equal(a, plain)


def test_labels_match_images() -> None:
    # A ridge classifier on the 32x32 pixels separates the digits: a label/image mix-up in the
    # conversion or the split would leave it near 10%.
    train, test = _load(True), _load(False)
    x, y = train.batch(range(len(train)))
    xt, yt = test.batch(range(len(test)))
    feats = torch.cat([x[:, 0].flatten(1), torch.ones(len(x), 1)], 1).double()
    target = torch.nn.functional.one_hot(y, 10).double()
    gram = feats.T @ feats + 10.0 * torch.eye(feats.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, feats.T @ target)
    test_feats = torch.cat([xt[:, 0].flatten(1), torch.ones(len(xt), 1)], 1).double()
    accuracy = float(((test_feats @ w).argmax(1) == yt).double().mean())
    assert accuracy > 0.9


# ----------------------------------------------------------------------------- partitions


def test_partitions_cover_the_training_set(tmp_path: Path) -> None:
    splits = [load_partition("digits", i, 3, root=tmp_path, seed=2)[0] for i in range(3)]
    assert [len(s) for s in splits] == [499, 499, 499]
    owned = torch.cat([s.dataset_indices for s in splits if s.dataset_indices is not None])
    assert torch.equal(owned.sort().values, torch.arange(DIGITS_TRAIN_SIZE))
    train = _load(True)
    for s in splits:
        assert s.dataset_indices is not None
        assert torch.equal(s.labels, train.labels[s.dataset_indices])
        x, _ = s.batch([0, 1])
        assert torch.equal(x, train.batch(s.dataset_indices[:2])[0])
    skewed, local_test = load_partition(
        "digits", 0, 3, root=tmp_path, scheme="dirichlet", alpha=0.05, test_fraction=0.2
    )
    assert local_test is not None and len(local_test) >= 1
    assert torch.bincount(skewed.labels, minlength=10).max().item() / len(skewed) > 0.3


def test_partition_is_read_back_from_the_disk_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = load_partition("digits", 1, 2, root=tmp_path, seed=3)
    entries = sorted((tmp_path / store.CACHE_DIRNAME).glob("partition-*"))
    assert len(entries) == 1
    data.clear_cache()

    def no_sklearn(train: bool) -> ImageTensorDataset:
        raise AssertionError("a cached partition must not read scikit-learn again")

    monkeypatch.setattr(digits, "load_sklearn_digits", no_sklearn)
    again, _ = load_partition("digits", 1, 2, root=tmp_path, seed=3)  # a fresh process's view
    assert torch.equal(again.indices, first.indices)
    assert first.dataset_indices is not None and again.dataset_indices is not None
    assert torch.equal(again.dataset_indices, first.dataset_indices)
    assert torch.equal(again.batch(range(len(again)))[0], first.batch(range(len(first)))[0])
    assert not again.dataset.flip  # type: ignore[attr-defined]

    # Another scikit-learn version keys a new entry (its data could differ).
    monkeypatch.setattr(digits, "digits_version", lambda: "scikit-learn-0.0-conversion-1")
    data.clear_cache()
    with pytest.raises(AssertionError, match="must not read"):
        load_partition("digits", 1, 2, root=tmp_path, seed=3)


# ----------------------------------------------------------------------------- without sklearn


def test_missing_scikit_learn_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetUnavailableError, match="pip install scikit-learn") as info:
        load_dataset("digits")
    assert "\n" not in str(info.value) and 'dataset="synthetic"' in str(info.value)

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert digits.digits_version() is None  # no disk cache keyed on a version it cannot know


# ----------------------------------------------------------------------------- models and config


@pytest.mark.parametrize(
    ("arch", "cut"),
    [(a, c) for a in ARCHS if input_shape(a) == (3, 32, 32) for c in ("shallow", "deep")],
)
def test_split_model_forward_on_a_batch(arch: str, cut: str) -> None:
    x, y = _load(True).batch(range(4))
    torch.manual_seed(0)
    client, server = split_model(arch, cut, dataset_num_classes("digits"))
    client.eval(), server.eval()
    with torch.no_grad():
        logits = server(client(x))
    assert logits.shape == (4, 10) and bool(torch.isfinite(logits).all())
    assert y.shape == (4,)


def test_config_accepts_digits(tmp_path: Path) -> None:
    config = SplitConfig.from_run_config(
        {"dataset": "digits", "data-root": str(tmp_path), "batch-size": 16}
    )
    assert config.dataset == "digits" and num_classes(config) == 10
    train, local_test = client_data(config, 0, 2)
    assert len(train) in (748, 749) and local_test is None
    assert len(evaluation_data(config)) == DIGITS_TEST_SIZE
    with pytest.raises(ConfigError, match="digits"):
        SplitConfig.from_run_config({"dataset": "digitz"})  # the choices name it


def test_digits_study_file_runs_every_policy_on_digits() -> None:
    from flwr_splitms.study.spec import StudySpec

    spec = StudySpec.from_toml(Path(__file__).parents[1] / "studies" / "digits.toml")
    assert spec.policies == ("none", "qu", "sp", "rt", "ms", "budget") and len(spec.seeds) == 3
    assert spec.baseline == "none" and len(spec.cuts) == 1
    configs = [run.config() for run in spec.runs()]
    assert len(configs) == 18 and {c.dataset for c in configs} == {"digits"}
    assert {c.codec for c in configs} == {"none", "qu", "sp", "rt", "ms", "budget"}
    # budget.toml's number is what MS costs at the deep cut and batch 16 (tests/test_budget.py)
    budget = [c for c in configs if c.codec == "budget"]
    assert {(c.cut, c.batch_size, c.budget_bits) for c in budget} == {("deep", 16, 2.3222)}
    assert {c.lr_scaling for c in configs} == {"linear"}  # what the recorded results used
