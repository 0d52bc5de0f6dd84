"""The README's code for plugging MSSplitStrategy into a ServerApp runs as written."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from inprocess_grid import InProcessGrid

from flwr_splitms import data

README = Path(__file__).parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- tested: {name}.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README lost its tested block {name!r}"
    return match.group(1)


def test_readme_server_and_client_blocks_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Keep the synthetic set small: the README's code imports these names from flwr_splitms.data.
    monkeypatch.setattr(data, "load_dataset", functools.partial(data.load_dataset, size=48))
    monkeypatch.setattr(data, "load_partition", functools.partial(data.load_partition, size=64))
    server: dict[str, object] = {}
    client: dict[str, object] = {}
    exec(compile(readme_block("server_app"), "README-server", "exec"), server)
    exec(compile(readme_block("client_app"), "README-client", "exec"), client)
    run_config = {
        "dataset": "synthetic",
        "num-server-rounds": 1,
        "steps-per-round": 2,
        "batch-size": 4,
    }
    grid = InProcessGrid(client["app"], 2, run_config)  # type: ignore[arg-type]
    context = Context(
        run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server["main"](grid, context)  # type: ignore[operator]
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["round"]) == [1] and history["num_clients"].iloc[0] == 2
    assert history["uplink_raw_bytes"].iloc[0] / history["uplink_bytes"].iloc[0] > 12
