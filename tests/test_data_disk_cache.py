"""The on-disk data cache: a fresh process reads its partition instead of rebuilding it."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_data import write_fake_digits

from flwr_splitms import data
from flwr_splitms.data import DataSplit, load_dataset, load_partition, loading
from flwr_splitms.data import disk_cache as store

KWARGS: dict[str, Any] = {"size": 120, "num_classes": 4, "seed": 3, "test_fraction": 0.25}


@pytest.fixture(autouse=True)
def _fresh_process_cache() -> Iterator[None]:
    data.clear_cache()
    yield
    data.clear_cache()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the costly builders: the synthetic generator and the partitioner."""
    counts = {"generate": 0, "partition": 0}

    def spy(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(loading, "generate_synthetic", spy("generate", loading.generate_synthetic))
    monkeypatch.setattr(loading, "partition", spy("partition", loading.partition))
    return counts


def _entries(root: Path, kind: str) -> list[Path]:
    return sorted((root / store.CACHE_DIRNAME).glob(f"{kind}-*"))


def _same(a: DataSplit, b: DataSplit) -> None:
    assert torch.equal(a.indices, b.indices) and a.dataset_indices is not None
    assert b.dataset_indices is not None and torch.equal(a.dataset_indices, b.dataset_indices)
    pos = torch.arange(len(a))
    for seed in (1, 2):
        ga, gb = (torch.Generator().manual_seed(seed) for _ in "ab")
        xa, ya = a.batch(pos, augment=True, generator=ga)
        xb, yb = b.batch(pos, augment=True, generator=gb)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_second_load_reads_the_cache(tmp_path: Path, calls: dict[str, int]) -> None:
    train, test = load_partition("synthetic", 1, 3, root=tmp_path, **KWARGS)
    assert calls == {"generate": 1, "partition": 1}
    assert len(_entries(tmp_path, "partition")) == 1 and len(_entries(tmp_path, "synthetic")) == 1
    data.clear_cache()  # what a fresh ClientApp process starts with
    again_train, again_test = load_partition("synthetic", 1, 3, root=tmp_path, **KWARGS)
    assert calls == {"generate": 1, "partition": 1}  # nothing rebuilt
    assert again_train.dataset is not train.dataset
    assert isinstance(again_train.dataset, data.ImageTensorDataset)
    assert again_test is not None and test is not None
    _same(train, again_train)
    _same(test, again_test)
    # Another partition of the same data: the dataset comes from its cache, not the generator.
    data.clear_cache()
    load_partition("synthetic", 2, 3, root=tmp_path, **KWARGS)
    assert calls == {"generate": 1, "partition": 2}
    assert len(_entries(tmp_path, "partition")) == 2
    # The cached arrays are memory-mapped, not read into memory.
    entry = store.read_entry(_entries(tmp_path, "synthetic")[0], _synthetic_key())
    assert entry is not None and isinstance(entry[0]["images"], np.memmap)


def _synthetic_key() -> dict[str, Any]:
    return {
        "dataset": "synthetic",
        "version": loading.SYNTHETIC_VERSION,
        "num_classes": KWARGS["num_classes"],
        "size": KWARGS["size"],
        "seed": KWARGS["seed"],
        "train": True,
    }


def test_every_key_part_selects_its_own_entry(tmp_path: Path) -> None:
    base: dict[str, Any] = {"root": tmp_path, "size": 60, "num_classes": 3}
    load_partition("synthetic", 0, 2, **base)
    for change in (
        {"seed": 1},
        {"scheme": "dirichlet"},
        {"scheme": "dirichlet", "alpha": 0.1},
        {"size": 61},
        {"num_classes": 4},
    ):
        load_partition("synthetic", 0, 2, **{**base, **change})
    load_partition("synthetic", 1, 2, **base)
    load_partition("synthetic", 0, 3, **base)
    assert len(_entries(tmp_path, "partition")) == 8
    data.clear_cache()
    off = tmp_path / "off"
    load_partition("synthetic", 0, 2, **{**base, "root": off}, disk_cache=False)
    assert not (off / store.CACHE_DIRNAME).exists()


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "no-meta", "bad-json"])
def test_damaged_entry_is_detected_and_rebuilt(
    damage: str, tmp_path: Path, calls: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = load_partition("synthetic", 0, 2, root=tmp_path, **KWARGS)
    [entry] = _entries(tmp_path, "partition")
    images = entry / "images.npy"
    if damage == "truncate":  # a half-written file
        images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    elif damage == "flip-byte":  # same size, one pixel altered
        raw = bytearray(images.read_bytes())
        raw[-1] ^= 0xFF
        images.write_bytes(bytes(raw))
    elif damage == "no-meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    data.clear_cache()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        again, _ = load_partition("synthetic", 0, 2, root=tmp_path, **KWARGS)
    assert "damaged" in caplog.text and "rebuilding" in caplog.text
    assert calls["partition"] == 2  # rebuilt (from the intact cached dataset)
    _same(first, again)
    data.clear_cache()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        load_partition("synthetic", 0, 2, root=tmp_path, **KWARGS)
    assert calls["partition"] == 2 and "damaged" not in caplog.text  # the rebuilt entry is good
    assert not list((tmp_path / store.CACHE_DIRNAME).glob(".t*"))  # no temp or trash left


def test_real_dataset_files_changing_invalidate_the_cache(tmp_path: Path) -> None:
    write_fake_digits(tmp_path, "mnist", n_train=20, n_test=4)
    before, _ = load_partition("mnist", 0, 2, root=tmp_path)
    assert len(_entries(tmp_path, "partition")) == 1
    raw = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    content = bytearray(raw.read_bytes())
    content[16:] = bytes(255 - b for b in content[16:])  # new pixels, same size
    raw.write_bytes(bytes(content))
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    data.clear_cache()
    after, _ = load_partition("mnist", 0, 2, root=tmp_path)
    assert len(_entries(tmp_path, "partition")) == 2
    xb, _ = before.batch([0])
    xa, _ = after.batch([0])
    assert not torch.equal(xa, xb)


_CHILD = """
import hashlib, pathlib, sys, time
import torch
torch.set_num_threads(1)
from flwr_splitms.data import load_partition
root, me = pathlib.Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while not (root / "go").exists():  # both processes reach the cold cache together
    time.sleep(0.005)
train, _ = load_partition("synthetic", 1, 2, root=root, size=400, num_classes=4, seed=9)
x, y = train.batch(torch.arange(len(train)))
print(hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
"""


def test_concurrent_first_loads_both_succeed(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    digests = {out.strip() for out, _ in outs}
    assert len(digests) == 1
    # The entry on disk is complete and gives the same batch.
    train, _ = load_partition("synthetic", 1, 2, root=tmp_path, size=400, num_classes=4, seed=9)
    x, y = train.batch(torch.arange(len(train)))
    assert hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest() in digests
    assert len(_entries(tmp_path, "partition")) == 1
    assert not list((tmp_path / store.CACHE_DIRNAME).glob(".t*"))


def test_unwritable_cache_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(store.tempfile, "mkdtemp", refuse)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        train, _ = load_partition("synthetic", 0, 2, root=tmp_path, size=40, num_classes=2)
    assert len(train) == 20 and "continuing without it" in caplog.text
    assert load_dataset("synthetic", tmp_path, size=40, num_classes=2).num_classes == 2


def test_a_second_writer_keeps_the_first_entry(tmp_path: Path) -> None:
    key = {"dataset": "x", "seed": 1}
    path = store.entry_path(tmp_path, "demo", key)
    assert store.write_entry(path, key, {"v": np.arange(5)}, {"a": 1})
    assert store.write_entry(path, key, {"v": np.arange(5)}, {"a": 1})  # lost the race: fine
    entry = store.read_entry(path, key)
    assert entry is not None and entry[1] == {"a": 1}
    assert np.array_equal(entry[0]["v"], np.arange(5))
    assert [p.name for p in (tmp_path / store.CACHE_DIRNAME).iterdir()] == [path.name]
    assert store.read_entry(path, {"dataset": "x", "seed": 2}) is None  # a foreign key is refused
