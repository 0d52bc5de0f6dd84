"""The tabular example on an existing two-node Ray cluster, through ``flwr run`` (Flower's
simulation engine), as docs/deployment.md's "Simulation on a Ray cluster" tells a user to run it.

Both Ray nodes run on this machine (private temp dirs and ports, see ``ray_processes.py``), with
one CPU each, so ``client-resources-num-cpus=1`` gives one ClientApp actor per node. The app is a
copy of ``examples/tabular_mlp`` whose ClientApp records the Ray node of every message it handles
(``ray_client_app.py``). Every process started here is stopped by its PID: the Ray nodes'
process trees and the local SuperLink that ``flwr run`` starts; nothing is found by name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flower_processes import BIN, flower_env, run_config_string, stop_local_superlink
from ray_processes import RayCluster, RayStartError

ROOT = Path(__file__).parents[1]
TABULAR_APP = ROOT / "examples" / "tabular_mlp"
CLIENTAPP = 'clientapp = "tabular_mlp.client_app:app"'
pytestmark = pytest.mark.slow


def recording_app(dest: Path) -> Path:
    """A copy of the tabular example whose ClientApp records the Ray node of every message."""
    shutil.copytree(TABULAR_APP, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("ray_client_app.py"), dest / "tabular_mlp")
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    assert CLIENTAPP in text, f"{TABULAR_APP}/pyproject.toml no longer has {CLIENTAPP}"
    pyproject.write_text(text.replace(CLIENTAPP, CLIENTAPP.replace("client_app", "ray_client_app")))
    return dest


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """A head and a worker node with one CPU each; skipped only when no Ray node can start."""
    record = tmp_path / "ray-record.jsonl"
    with RayCluster(tmp_path / "ray-logs", env={"SPLITMS_TEST_RAY_RECORD": str(record)}) as nodes:
        try:
            nodes.start_head("head")
        except RayStartError as err:
            pytest.skip(f"Ray cannot start on this machine: {err}")
        nodes.add_node("worker")
        yield nodes


def test_tabular_example_on_two_node_ray_cluster(tmp_path: Path, cluster: RayCluster) -> None:
    """`RAY_ADDRESS=<head> flwr run`: the run completes; both Ray nodes handle client messages."""
    app = recording_app(tmp_path / "app")
    env = flower_env(tmp_path / "flwr-home", RAY_ADDRESS=cluster.address)
    command = [
        str(BIN / "flwr"), "run", str(app), "--stream",
        "--run-config", run_config_string({"num-server-rounds": 1, "steps-per-round": 2}),
        "--federation-config", "num-supernodes=4 client-resources-num-cpus=1",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path
        )
    finally:
        stop_local_superlink(env)  # the run's Ray driver (flwr-simulation) is its child
    output = done.stdout + done.stderr
    logs = output + "".join(f"\n--- {n} ---\n{cluster.log(n)[-2000:]}" for n in cluster.nodes)
    assert done.returncode == 0, logs
    found = re.search(r"tabular_mlp: test accuracy ([\d.]+) after 1 rounds", output)
    assert found and 0 <= float(found[1]) <= 1, logs

    record = tmp_path / "ray-record.jsonl"
    assert record.exists(), f"no ClientApp message was recorded:\n{logs}"
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    # Every simulated SuperNode ran its round to the end ...
    ends = {e["partition_id"] for e in entries if e["message_type"] == "train.split_end"}
    assert ends == {0, 1, 2, 3}, entries
    # ... and the messages ran on both Ray nodes, each one Ray node (one id per name).
    ray_nodes = {(e["node"], e["ray_node_id"]) for e in entries}
    assert {name for name, _ in ray_nodes} == {"head", "worker"}, entries
    assert len({ray_id for _, ray_id in ray_nodes}) == 2, entries

    tree = cluster.tree()
    cluster.stop()
    assert not [pid for pid in tree if _alive(pid)], "a Ray process outlived RayCluster.stop"
    assert not cluster.leftovers, f"processes of the cluster outside its trees: {cluster.leftovers}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
