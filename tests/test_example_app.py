"""The example ServerApp as a newcomer meets it: clear stops, one folder per run, resume."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from inprocess_grid import InProcessGrid
from split_app import client_app

from flwr_splitms.config import SplitConfig
from flwr_splitms.strategy import NotEnoughNodesError

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "cifar100_resnet18"))
from cifar100_resnet18 import server_app


def _context(run_config: dict, run_id: int = 1) -> Context:  # type: ignore[type-arg]
    return Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )


def _run(
    config: SplitConfig, nodes: int = 2, run_id: int = 1, **overrides: object
) -> InProcessGrid:
    run_config = {**config.to_run_config(), **overrides}
    grid = InProcessGrid(client_app(), nodes, run_config, run_id=run_id)
    server_app.main(grid, _context(run_config, run_id))
    return grid


@pytest.fixture
def config(tiny_config: SplitConfig) -> SplitConfig:
    return tiny_config.replace(num_server_rounds=1, node_wait=0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"codec-ratio": 1.5}, "codec-ratio=1.5"),
        ({"codec": "zip"}, 'codec="zip": unknown codec'),
        ({"steps-per-rnd": 2}, "steps-per-round"),
        ({"batch-size": 40}, "batch-size=40"),
        ({"device": "cuda:7"}, "device"),
    ],
)
def test_bad_run_config_stops_before_training(
    config: SplitConfig,
    overrides: dict,
    message: str,
    caplog: pytest.LogCaptureFixture,  # type: ignore[type-arg]
) -> None:
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(server_app.RunConfigError):
        _run(config, **overrides)
    assert message in caplog.text
    assert not (Path(config.output_dir)).exists()  # nothing written, no round started


def test_missing_dataset_is_one_line(config: SplitConfig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(server_app.RunConfigError):
        _run(config, dataset="cifar10", **{"data-download": False})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and 'dataset="synthetic"' in errors[0].getMessage()


def test_too_few_nodes_stop_after_node_wait(
    config: SplitConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(NotEnoughNodesError) as err:
        _run(config, nodes=1)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"The run stops: {err.value}"]  # one line, logged before the traceback
    assert "1 node(s) connected after waiting 0.5s, the run needs 2 (min-nodes)" in errors[0]
    assert 'num-supernodes=N", or lower min-nodes' in errors[0]  # the fix


def test_a_problem_after_the_checks_is_logged_before_it_raises(
    config: SplitConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop inside training (here: the test set is missing) logs its line too, once."""
    from flwr_splitms.data import DatasetUnavailableError

    def missing(_: SplitConfig) -> None:
        raise DatasetUnavailableError("cifar10 is not in /x; set data-download=true")

    monkeypatch.setattr(server_app, "evaluation_data", missing)
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(DatasetUnavailableError):
        _run(config)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["The run stops: cifar10 is not in /x; set data-download=true"]


def test_a_bug_is_not_dressed_as_a_known_problem(
    config: SplitConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: SplitConfig) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(server_app, "evaluation_data", broken)
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(KeyError):
        _run(config)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # Flower's traceback


def test_runs_get_their_own_folders_and_resume_continues_the_latest(config: SplitConfig) -> None:
    root = Path(config.output_dir)
    _run(config, run_id=1)
    _run(config, run_id=2)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "latest")
    assert len(folders) == 2 and (root / "latest").resolve() == folders[-1].resolve()
    for folder in folders:
        assert (folder / "history.csv").is_file() and (folder / "run.json").is_file()
        assert (folder / "checkpoint-round-0001.pt").is_file()

    _run(config, run_id=3, resume=True, **{"num-server-rounds": 2})
    assert len([p for p in root.iterdir() if p.is_dir() and p.name != "latest"]) == 2
    history = pd.read_csv(folders[-1] / "history.csv")
    assert history["round"].tolist() == [1, 2]

    with pytest.raises(server_app.RunConfigError, match=r"lr: 0\.05 -> 0\.2"):
        _run(config, run_id=4, resume=True, lr=0.2)
