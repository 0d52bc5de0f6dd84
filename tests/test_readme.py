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


def test_every_python_block_of_the_readme_is_tested() -> None:
    text = README.read_text()
    blocks = re.findall(r"(<!-- tested: (\w+)[^>]*-->\s*)?```python\n", text)
    assert blocks and all(tag for _, tag in blocks), "a python block without <!-- tested: -->"
    assert {tag for _, tag in blocks} == {
        "server_app",
        "client_app",
        "codecs",
        "own_model",
        "local_engine",
        "history",
        "aggregator",
        "budget",
    }


def test_readme_aggregator_block() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedMedian

    namespace: dict[str, object] = {}
    exec(compile(readme_block("aggregator"), "README-aggregator", "exec"), namespace)
    assert isinstance(namespace["robust"].aggregator, FedMedian)  # type: ignore[attr-defined]
    private = namespace["private"].aggregator  # type: ignore[attr-defined]
    assert isinstance(private, DifferentialPrivacyServerSideFixedClipping)


def test_readme_codecs_block(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme_block("codecs"), "README-codecs", "exec"), {})
    nbytes, error = capsys.readouterr().out.split()
    assert int(nbytes) == 1216348 and 0.2 < float(error) < 0.3


def test_readme_local_engine_and_own_model_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # the synthetic data's default root
    for name in ("local_engine", "own_model"):
        namespace: dict[str, object] = {}
        exec(compile(readme_block(name), f"README-{name}", "exec"), namespace)
        history = namespace["result"].history  # type: ignore[attr-defined]
        assert history["test_accuracy"].notna().all()
        assert (history["uplink_bytes"] < history["uplink_raw_bytes"]).all()
    assert history["test_accuracy"].iloc[-1] > 0.8  # the README says about 0.93


def test_readme_history_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    monkeypatch.chdir(tmp_path)
    for policy, scale in (("none", 1.0), ("ms", 1 / 13.79)):
        folder = tmp_path / "outputs" / "study" / "default" / "runs" / f"{policy}-deep-s0"
        folder.mkdir(parents=True)
        pd.DataFrame(
            {
                "round": [1, 2, 3],
                "train_loss": [2.0, 1.5, 1.2],
                "test_accuracy": [0.2, 0.3, 0.4],
                "uplink_bytes": [1e6 * scale] * 3,
                "downlink_bytes": [1e6] * 3,
            }
        ).to_csv(folder / "history.csv", index=False)
        (folder / "run.json").write_text(json.dumps({"codec": policy, "cut": "deep"}))
    exec(compile(readme_block("history"), "README-history", "exec"), {})
    assert "1.86" in capsys.readouterr().out  # MS's total saving with raw gradients


def test_readme_budget_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flwr_splitms.core.budget import budget_nbytes

    monkeypatch.setenv("HOME", str(tmp_path))  # the synthetic data's default root
    namespace: dict[str, object] = {}
    exec(compile(readme_block("budget"), "README-budget", "exec"), namespace)
    history = namespace["history"]
    assert history["codec_choice"].notna().all()  # type: ignore[index]
    per_message = history["uplink_bytes"] / (history["steps"] * 2)  # type: ignore[index]
    assert per_message.max() <= budget_nbytes(2.3222, 16 * 64 * 32 * 32)
    assert "codec_choice" in capsys.readouterr().out
