"""Shared fixtures: tiny synthetic configurations that keep the suite fast on two CPU cores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/inprocess_grid.py

from flwr_splitms.config import SplitConfig

torch.set_num_threads(1)  # small convolutions run faster single-threaded on 2 cores


@pytest.fixture
def tiny_config(tmp_path: Path) -> SplitConfig:
    """ResNet18 split on 64 synthetic images: a few steps take seconds."""
    return SplitConfig(
        dataset="synthetic",
        synthetic_size=64,
        num_classes=10,
        data_root=str(tmp_path / "data"),
        num_server_rounds=2,
        steps_per_round=2,
        batch_size=4,
        eval_batch_size=32,
        eval_max_examples=16,
        lr=0.05,
        codec="ms",
        seed=3,
        output_dir=str(tmp_path / "out"),
    )
