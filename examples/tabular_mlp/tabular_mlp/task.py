"""The model and the data of the app: an MLP over the rows of a table, split after its first layer.

The table is your CSV (``csv-path``: numeric feature columns and an integer ``label-column``) or,
offline, a generated one (``num-rows`` x ``num-features``, deterministic in ``seed``). Rows are
shuffled with ``seed``, ``test-fraction`` of them are held out for the server's evaluation, and
features are standardised with the training rows' statistics. Training rows get Gaussian noise
of std ``jitter`` every time they are read: a random transform, which ``from_torch_dataset``
replays exactly when a client recomputes a batch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import UserConfig
from torch import nn
from torch.utils.data import Dataset

from flwr_splitms.data import BatchSource, DataSplit, from_torch_dataset, partition
from flwr_splitms.models import split_sequential

CUT = "act1"  # the client runs fc1 and act1 and sends act1's output (batch x hidden)


class TableRows(Dataset[tuple[torch.Tensor, int]]):
    """Rows of a feature matrix with integer labels; ``jitter`` > 0 adds noise on every read."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, jitter: float = 0.0) -> None:
        self.features, self.targets, self.jitter = features, labels, jitter

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.features[i]
        if self.jitter > 0:
            row = row + self.jitter * torch.randn_like(row)  # torch's global RNG
        return row, int(self.targets[i])


def generated_table(rows: int, features: int, classes: int, seed: int) -> pd.DataFrame:
    """A table with a learnable label: Gaussian clusters, one per class, plus a nonlinear column."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, size=(classes, features))
    labels = rng.integers(0, classes, size=rows)
    values = centers[labels] + rng.normal(0.0, 1.5, size=(rows, features))
    values[:, 0] = values[:, 0] ** 2  # a skewed column, as real tables have
    table = pd.DataFrame(values, columns=[f"x{j}" for j in range(features)])
    table["label"] = labels
    return table


def read_table(config: UserConfig) -> tuple[pd.DataFrame, str]:
    """The CSV at ``csv-path`` (or a generated table) and the name of its label column."""
    path = str(config["csv-path"])
    if not path:
        table = generated_table(
            int(config["num-rows"]),
            int(config["num-features"]),
            int(config["num-classes"]),
            int(config["seed"]),
        )
        return table, "label"
    label = str(config["label-column"])
    table = pd.read_csv(Path(path).expanduser())
    if label not in table.columns:
        raise ValueError(
            f"{path} has no column {label!r} (columns: {', '.join(map(str, table.columns))}); "
            "set label-column to the column that holds the class ids"
        )
    return table, label


def load_data(config: UserConfig) -> tuple[TableRows, TableRows, int]:
    """Training rows (with jitter), test rows (without) and the number of classes."""
    table, label = read_table(config)
    features = table.drop(columns=[label])
    if not all(pd.api.types.is_numeric_dtype(t) for t in features.dtypes):
        raise ValueError("every column but the label must be numeric; encode the others first")
    labels = torch.as_tensor(pd.factorize(table[label], sort=True)[0], dtype=torch.int64)
    x = torch.tensor(features.to_numpy(dtype=np.float32))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(config["seed"])))
    held_out = int(len(x) * float(config["test-fraction"]))
    test, train = order[:held_out], order[held_out:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    jitter = float(config["jitter"])
    num_classes = int(labels.max()) + 1
    return TableRows(x[train], labels[train], jitter), TableRows(x[test], labels[test]), num_classes


def split_mlp(
    num_features: int, hidden: int, num_classes: int, seed: int
) -> tuple[nn.Module, nn.Module]:
    """The MLP, split after ``act1`` with ``split_sequential``: (client_net, server_net)."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(num_features, hidden),
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, hidden),
            act2=nn.ReLU(),
            head=nn.Linear(hidden, num_classes),
        )
    )
    return split_sequential(mlp, at=CUT)


def build(config: UserConfig) -> tuple[nn.Module, nn.Module, TableRows, TableRows]:
    """Both halves of the network, and the training and test rows."""
    train, test, num_classes = load_data(config)
    client_net, server_net = split_mlp(
        train.features.shape[1],
        int(config["hidden"]),
        num_classes,
        int(config["seed"]),
    )
    return client_net, server_net, train, test


def client_rows(train: TableRows, partition_id: int, num_partitions: int, seed: int) -> BatchSource:
    """This client's IID share of the training rows, as a BatchSource."""
    source = from_torch_dataset(train)
    parts = partition(source.labels, num_partitions, seed=seed)
    return DataSplit(source, torch.from_numpy(parts[partition_id]))
