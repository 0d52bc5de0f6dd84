"""End to end through Flower's own processes: ``flwr run`` on the simulation engine, and real
deployments (one SuperLink, SuperNodes on loopback). Every process started here is stopped by
its PID (see ``flower_processes.py``); nothing is found or killed by name.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
from flower_processes import (
    BIN,
    Deployment,
    flower_env,
    run_config_string,
    stop_local_superlink,
    stop_tree,
)

ROOT = Path(__file__).parents[1]
APP = ROOT / "examples" / "cifar100_resnet18"
TABULAR_APP = ROOT / "examples" / "tabular_mlp"
pytestmark = pytest.mark.slow


def run_config(tmp_path: Path, **extra: object) -> str:
    settings: dict[str, object] = {
        "dataset": "synthetic",
        "synthetic-size": 160,
        "num-classes": 10,
        "num-server-rounds": 1,
        "steps-per-round": 2,
        "batch-size": 4,
        "eval-max-examples": 16,
        "data-root": str(tmp_path / "data"),
        "output-dir": str(tmp_path / "out"),
        **extra,
    }
    return run_config_string(settings)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private Flower home and ports; the local SuperLink ``flwr run`` starts is stopped."""
    environment = flower_env(tmp_path / "flwr-home")
    try:
        yield environment
    finally:
        stop_local_superlink(environment)


def history_of(out: Path) -> pd.DataFrame:
    """The run's history.csv (in ``out`` or the newest run folder under it)."""
    found = sorted(out.rglob("history.csv"), key=lambda p: p.stat().st_mtime)
    assert found, f"no history.csv under {out}"
    return pd.read_csv(found[-1])


def check_history(out: Path, clients: int) -> None:
    history = history_of(out)
    assert list(history["round"]) == [1]
    assert history["num_clients"].iloc[0] == clients and history["steps"].iloc[0] == 2
    assert history["uplink_raw_bytes"].iloc[0] / history["uplink_bytes"].iloc[0] > 12
    assert 0 <= history["test_accuracy"].iloc[0] <= 1
    assert history["downlink_bytes"].iloc[0] > 0
    assert list(out.rglob("final_weights.pt")) and list(out.rglob("run.json"))


def test_flwr_run_ten_simulated_supernodes(tmp_path: Path, env: dict[str, str]) -> None:
    """The README's command, offline: ten simulated clients on Ray, one short round."""
    command = [
        str(BIN / "flwr"), "run", str(APP), "--stream",
        "--run-config", run_config(tmp_path),
        "--federation-config", "num-supernodes=10",
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ROUND 1/1]" in done.stdout, done.stdout + done.stderr
    check_history(tmp_path / "out", clients=10)


@pytest.mark.skipif(not TABULAR_APP.exists(), reason="examples/tabular_mlp is not in this tree")
def test_flwr_run_tabular_example(tmp_path: Path, env: dict[str, str]) -> None:
    """The tabular example, offline, through ``flwr run --stream`` on the simulation engine."""
    config = run_config_string({"num-server-rounds": 1, "steps-per-round": 2})
    command = [str(BIN / "flwr"), "run", str(TABULAR_APP), "--stream", "--run-config", config]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(
        r"test accuracy ([\d.]+) after 1 rounds; uplink (\d+) bytes \(raw (\d+)\)", done.stdout
    )
    assert found, done.stdout + done.stderr
    accuracy, sent, raw = float(found[1]), int(found[2]), int(found[3])
    assert 0 <= accuracy <= 1 and 0 < sent < raw


def test_deployment_superlink_and_two_supernodes(tmp_path: Path, env: dict[str, str]) -> None:
    """A real deployment on loopback: flower-superlink and two flower-supernode processes."""
    with Deployment(tmp_path, env) as dep:
        dep.start_superlink()
        dep.start_supernodes(2)
        dep.wait_ready()
        started = set(dep.procs)
        done = dep.flwr_run(APP, run_config(tmp_path))
        assert done.returncode == 0, done.stdout + done.stderr + dep.tails()
        check_history(tmp_path / "out", clients=2)
        assert set(dep.procs) == started and all(p.poll() is None for p in dep.procs.values())
        tree = dep.tree()
        assert len(tree) > len(started)  # the SuperExecs (and ServerApp) are stopped too
    assert not [pid for pid in tree if _alive(pid)], "a process outlived Deployment.stop_all"


@pytest.mark.parametrize("nodes", ["flwr-splitms-supernode", "isolation-process"])
def test_deployment_with_forked_clientapps(tmp_path: Path, env: dict[str, str], nodes: str) -> None:
    """ClientApp tasks forked from flwr-splitms-superexec's template, started by
    ``flwr-splitms-supernode`` or beside ``flower-supernode --isolation process``."""
    env = {**env, "FLWR_LOG_LEVEL": "DEBUG"}
    tuned = nodes == "flwr-splitms-supernode"
    with Deployment(tmp_path, env) as dep:
        dep.start_superlink()
        dep.start_supernodes(2, warm=not tuned, tuned=tuned)
        dep.wait_ready()
        done = dep.flwr_run(APP, run_config(tmp_path))
        assert done.returncode == 0, done.stdout + done.stderr + dep.tails()
        check_history(tmp_path / "out", clients=2)
        for i in range(2):
            log = dep.log(f"supernode{i}" if tuned else f"superexec{i}")
            # round start (forward 1), gradient 1 + forward 2, round end: each a forked task
            assert log.count("Forked flwr-clientapp") == 3, dep.tails()
            assert "Start `flwr-clientapp` process" in log
        tree = dep.tree()
    # the SuperExecs, their templates and every forked task are stopped with the nodes
    assert not [pid for pid in tree if _alive(pid)], "a process outlived Deployment.stop_all"


def test_lost_supernode_costs_only_its_round(tmp_path: Path, env: dict[str, str]) -> None:
    """Three SuperNodes; one is killed (by PID) in round 1 of 2: the run completes, round 1
    averages the two survivors, round 2 trains on the two that are left."""
    with Deployment(tmp_path, env) as dep:
        dep.start_superlink()
        dep.start_supernodes(3)
        dep.wait_ready()
        config = run_config(
            tmp_path, **{"num-server-rounds": 2, "steps-per-round": 2, "min-nodes": 2}
        )
        # The deployment's clients answer every few seconds; kill supernode2 once round 1 runs.
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(APP), "deployment", "--stream", "--run-config", config],
            env=dep.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=tmp_path,
        )  # fmt: skip
        try:
            dep.wait_for(
                lambda: "train.split_step" in dep.log("supernode2"), "round 1's first step", 180
            )
            dep.stop("supernode2", kill=True)
            out, _ = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        assert run.returncode == 0, out + dep.tails()
    history = history_of(tmp_path / "out")
    assert list(history["round"]) == [1, 2], history
    # Round 1 sampled 3. Round 2 samples the dead node too while the SuperLink still lists it
    # (until its heartbeats time out, about 60 s): then it is dropped again in that round.
    assert history["num_clients"].iloc[0] == 3 and history["num_clients"].iloc[1] in (2, 3)
    assert list(history["steps"]) == [2, 2], history
    assert history["test_accuracy"].notna().all(), history
    assert "dropped from the round" in out, out
    # FedAvg of the survivors: both rounds aggregate exactly two clients' weights
    assert out.count("Received 2 results") == 2 and "Received 3 results" not in out, out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_tree_stops_children_only_of_its_pid(tmp_path: Path) -> None:
    """``stop_tree`` ends a process and its children, and leaves a sibling alone."""
    sleep = "import time; time.sleep(60)"
    spawn = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    sibling = subprocess.Popen([sys.executable, "-c", sleep])
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = psutil.Process(parent.pid).children()[0].pid
        stop_tree(parent.pid, timeout=5)
        parent.wait(timeout=5)
        assert not _alive(child) and parent.returncode is not None
        assert sibling.poll() is None
    finally:
        sibling.kill()
        sibling.wait()


def test_bad_run_config_ends_the_run_as_failed(tmp_path: Path, env: dict[str, str]) -> None:
    """codec-ratio=1.5: one line naming the key, no training, and `flwr list` says failed."""
    command = [
        str(BIN / "flwr"), "run", str(APP), "--stream",
        "--run-config", run_config(tmp_path, **{"codec-ratio": 1.5}),
        "--federation-config", "num-supernodes=2",
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    output = done.stdout + done.stderr
    assert "codec-ratio=1.5" in output and "[ROUND" not in output, output
    listed = subprocess.run(
        [str(BIN / "flwr"), "list", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "finished:failed" in listed.stdout, listed.stdout
