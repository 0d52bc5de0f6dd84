"""The per-process cache of client halves: bounded in count and bytes, least recently used out,
sized by what an idle node holds; and the bounded per-process partition cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flwr_splitms import client as client_module
from flwr_splitms import data
from flwr_splitms.client import CoreCache, cache_bytes_from_env, held_nbytes
from flwr_splitms.data import loading
from flwr_splitms.data.synthetic import generate_synthetic, synthetic_labels


def test_cache_drops_least_recently_used_beyond_the_count() -> None:
    cache = CoreCache(max_cores=3, max_bytes=10**9)
    for node in range(3):
        cache.put(node, f"core{node}", 10)
    assert cache.get(0) == "core0"  # 0 is now the most recently used
    cache.put(3, "core3", 10)
    assert 1 not in cache and {0, 2, 3} == set(cache.entries)
    assert len(cache) == 3 and cache.nbytes == 30 and cache.evicted == 1


def test_cache_holds_its_byte_bound_but_always_the_newest() -> None:
    cache = CoreCache(max_cores=100, max_bytes=250)
    for node in range(10):
        cache.put(node, node, 100)
        assert cache.nbytes <= 250 or len(cache) == 1
    assert list(cache.entries) == [8, 9] and cache.nbytes == 200
    cache.put("huge", "huge", 1000)  # larger than the bound: kept alone
    assert list(cache.entries) == ["huge"] and cache.nbytes == 1000
    cache.put("huge", "again", 10)  # a key put again replaces its entry and its size
    assert cache.nbytes == 10 and cache.get("huge") == "again"


def test_cache_bound_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client_module.CACHE_ENV, raising=False)
    assert cache_bytes_from_env() == 512 * 2**20
    monkeypatch.setenv(client_module.CACHE_ENV, "64")
    assert cache_bytes_from_env() == 64 * 2**20 and CoreCache().max_bytes == 64 * 2**20
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(client_module.CACHE_ENV, bad)
        with pytest.raises(ValueError, match=client_module.CACHE_ENV):
            cache_bytes_from_env()


def test_held_bytes_counts_each_storage_once() -> None:
    net = nn.Linear(100, 10)  # 1010 floats
    assert held_nbytes(net) == 1010 * 4
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)

    class Split:
        def __init__(self) -> None:
            self.images, self.view, self.labels = images, images[:4], np.zeros(8, np.int64)

    assert held_nbytes(Split()) == 8 * 48 + 8 * 8
    assert held_nbytes(net, net, Split()) == 1010 * 4 + 8 * 48 + 8 * 8


def test_synthetic_labels_without_images_equal_the_generated_ones() -> None:
    for train in (True, False):
        generated = generate_synthetic(7, 300, 11, train)
        assert torch.equal(synthetic_labels(7, 300, 11, train), generated.labels)
    labels = data.load_labels("synthetic", size=300, num_classes=7, seed=11)
    assert torch.equal(labels, generate_synthetic(7, 300, 11, True).labels)


def test_partition_cache_is_bounded(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    data.clear_cache()
    monkeypatch.setattr(loading, "MAX_CACHED_PARTITIONS", 3)
    try:
        first, _ = data.load_partition(
            "synthetic", 0, 8, root=tmp_path, size=64, num_classes=4, seed=1
        )
        for pid in range(1, 8):
            data.load_partition("synthetic", pid, 8, root=tmp_path, size=64, num_classes=4, seed=1)
        assert len(loading._PARTITIONS) == 3
        again, _ = data.load_partition(
            "synthetic", 0, 8, root=tmp_path, size=64, num_classes=4, seed=1
        )  # read back from the disk cache
        assert again.dataset is not first.dataset
        assert torch.equal(again.dataset_indices, first.dataset_indices)  # type: ignore[arg-type]
        x, y = again.batch(torch.arange(len(again)))
        x0, y0 = first.batch(torch.arange(len(first)))
        assert torch.equal(x, x0) and torch.equal(y, y0)
    finally:
        data.clear_cache()


def _train(config, cache: CoreCache, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from inprocess_grid import InProcessGrid
    from split_app import client_app, strategy

    from flwr_splitms import protocol as P

    monkeypatch.setattr(client_module, "_CORES", cache)
    grid = InProcessGrid(client_app(), 5, config.to_run_config())
    client_net, strat = strategy(config)
    result = strat.start(
        grid, P.state_to_record(client_net.state_dict()), num_rounds=config.num_server_rounds
    )
    return P.record_to_state(result.arrays)


def test_a_tiny_cache_rebuilds_nodes_and_trains_the_same(tiny_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Five nodes through a cache of two: dropped nodes are rebuilt and recompute their forward
    pass; the weights equal those of a cache that keeps every node."""
    config = tiny_config.replace(synthetic_size=100, num_server_rounds=2, steps_per_round=2)
    data.clear_cache()
    roomy = CoreCache(max_cores=100, max_bytes=10**10)
    expected = _train(config, roomy, monkeypatch)
    assert len(roomy) == 5 and roomy.evicted == 0
    data.clear_cache()
    tiny = CoreCache(max_cores=2, max_bytes=10**10)
    got = _train(config, tiny, monkeypatch)
    assert len(tiny) == 2 and tiny.evicted > 5
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    by_bytes = CoreCache(max_cores=100, max_bytes=roomy.nbytes // 3)
    data.clear_cache()
    _train(config, by_bytes, monkeypatch)
    assert by_bytes.nbytes <= roomy.nbytes // 3 and 1 <= len(by_bytes) < 5
