"""End to end through Flower's own processes: ``flwr run`` on the simulation engine, and a real
deployment (one SuperLink, two SuperNodes on loopback). Every process started here is stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).parents[1]
APP = ROOT / "examples" / "cifar100_resnet18"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items())


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private Flower home and ports, and the guarantee that no Flower process outlives us."""
    before = {p.pid for p in psutil.process_iter()}
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    try:
        yield env
    finally:
        stray = [
            p
            for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["pid"] not in before
            and any("flower-" in part or "flwr" in part for part in (p.info["cmdline"] or []))
        ]
        for proc in stray:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        psutil.wait_procs(stray, timeout=10)


def superlink_healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


def wait_for(ready: Callable[[], bool], what: str, logs: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tails = "".join(p.read_text(errors="replace")[-2000:] for p in logs.iterdir())
            pytest.fail(f"timed out waiting for {what}:\n{tails}")
        time.sleep(0.5)


def check_history(out: Path, clients: int) -> None:
    history = pd.read_csv(out / "history.csv")
    assert list(history["round"]) == [1]
    assert history["num_clients"].iloc[0] == clients and history["steps"].iloc[0] == 2
    assert history["uplink_raw_bytes"].iloc[0] / history["uplink_bytes"].iloc[0] > 12
    assert 0 <= history["test_accuracy"].iloc[0] <= 1
    assert history["downlink_bytes"].iloc[0] > 0
    assert (out / "final_weights.pt").exists() and (out / "run.json").exists()


def test_flwr_run_ten_simulated_supernodes(tmp_path: Path, flower_env: dict[str, str]) -> None:
    """The README's command, offline: ten simulated clients on Ray, one short round."""
    command = [
        str(BIN / "flwr"),
        "run",
        str(APP),
        "--stream",
        "--run-config",
        run_config(tmp_path),
        "--federation-config",
        "num-supernodes=10",
    ]
    done = subprocess.run(
        command, env=flower_env, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ROUND 1/1]" in done.stdout, done.stdout + done.stderr
    check_history(tmp_path / "out", clients=10)


def test_deployment_superlink_and_two_supernodes(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """A real deployment on loopback: flower-superlink and two flower-supernode processes."""
    port = free_port()  # flwr 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        handle = (logs / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=flower_env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        )

    start(
        "superlink",
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
    for i in range(2):
        start(
            f"supernode{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--node-config",
            f"partition-id={i} num-partitions=2",
            "--port",
            str(free_port()),
        )
    home = Path(flower_env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deployment"\n\n'
        f'[superlink.deployment]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    try:
        wait_for(lambda: superlink_healthy(port), "the SuperLink to answer /health", logs)
        for i in range(2):
            log = logs / f"supernode{i}.log"
            wait_for(
                lambda log=log: "SuperNode ID" in log.read_text(errors="replace"),
                f"SuperNode {i} to register",
                logs,
            )
        done = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(APP),
                "deployment",
                "--stream",
                "--run-config",
                run_config(tmp_path),
            ],
            env=flower_env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
        )
        detail = (
            done.stdout
            + done.stderr
            + "".join(p.read_text(errors="replace")[-3000:] for p in logs.iterdir())
        )
        assert done.returncode == 0, detail
        check_history(tmp_path / "out", clients=2)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(home, ignore_errors=True)
