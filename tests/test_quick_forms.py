"""The quick forms of docs/quickstart.md run exactly as written and reach their stated accuracy.

Each test takes a ```bash block from the doc, runs it with ``bash`` from the repository root and
reads the accuracy range stated after the block. Only the environment differs from a user's
shell: ``HOME`` is a temporary folder (so ``~/flwr-quick`` is private to the test) and every
``NAME_PORT=number`` of the block is swapped for a free port (so the test runs beside anyone
else's SuperLink). Every process the block starts is watched while it runs and must be gone
after it: the block itself stops what it started, by PID; leftovers are stopped here by PID and
fail the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import pytest
from flower_processes import BIN, free_port, stop_tree

ROOT = Path(__file__).parents[1]
DOC = ROOT / "docs" / "quickstart.md"
PORT_SETTING = re.compile(r"\b(\w+_PORT)=(\d+)\b")
FLOWER_DEFAULT_PORTS = {"9091", "9092", "9093", "9094", "39091", "39093"}
pytestmark = pytest.mark.slow


@dataclass
class QuickForm:
    """One block of the doc and the accuracy range stated right after it."""

    script: str
    low: float
    high: float


def quick_form(name: str) -> QuickForm:
    """The ```bash block tagged ``<!-- quick form: NAME -->`` and the range after it."""
    text = DOC.read_text()
    match = re.search(
        rf"<!-- quick form: {name} -->\s*```bash\n(.*?)```(.*?)(?=<!-- quick form|\Z)", text, re.S
    )
    assert match, f"docs/quickstart.md lost its quick form {name!r}"
    stated = re.search(r"accuracy is between (\d+\.\d+) and (\d+\.\d+)", match.group(2))
    assert stated, f"no 'accuracy is between LOW and HIGH' after the quick form {name!r}"
    return QuickForm(match.group(1), float(stated[1]), float(stated[2]))


def with_free_ports(script: str) -> tuple[str, dict[str, int]]:
    """``script`` with each ``NAME_PORT=number`` set to a distinct free port instead."""
    ports: dict[str, int] = {}

    def swap(found: re.Match[str]) -> str:
        assert found[2] not in FLOWER_DEFAULT_PORTS, f"{found[0]}: a Flower default port"
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[found[1]] = port
        return f"{found[1]}={port}"

    return PORT_SETTING.sub(swap, script), ports


@dataclass
class BlockRun:
    """What running a block did: its output, wall seconds and every process it started."""

    output: str
    seconds: float
    started: dict[tuple[int, float], str] = field(default_factory=dict)  # (pid, start) -> name
    cpu: dict[tuple[int, float], float] = field(default_factory=dict)  # last CPU seconds seen

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def run_block(script: str, home: Path, timeout: float) -> BlockRun:
    """Run ``script`` with ``bash`` in the repository root, watching its process tree."""
    env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLWR_HOME", None)
    log = home / "block.log"
    begin = time.monotonic()
    with log.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    run = BlockRun("", 0.0)
    try:
        while shell.poll() is None:
            if time.monotonic() - begin > timeout:
                raise AssertionError(f"the block ran past {timeout:.0f} s:\n{log.read_text()}")
            _watch(psutil.Process(shell.pid), run)
            time.sleep(0.5)
    finally:
        if shell.poll() is None:
            stop_tree(shell.pid)
        run.seconds = time.monotonic() - begin
        run.output = log.read_text(errors="replace")
        left = _wait_gone(run, 120)
        for pid, _ in left:
            stop_tree(pid)
    assert not left, f"processes outlived the block: {[run.started[p] for p in left]}"
    return run


def drop_checkpoints(folder: Path) -> None:
    """Delete the runs' weights (about 130 MB a run) once the test has read the history."""
    for path in folder.rglob("*.pt"):
        path.unlink()


def _watch(shell: psutil.Process, run: BlockRun) -> None:
    """Record ``shell`` and every descendant now, with their CPU seconds so far."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in [shell, *shell.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied), proc.oneshot():
                key = (proc.pid, proc.create_time())
                # the latest command line: a subshell seen before its exec becomes its program
                run.started[key] = " ".join(proc.cmdline()[:2]) or proc.name()
                times = proc.cpu_times()
                run.cpu[key] = times.user + times.system


def _alive(pid: int, created: float) -> bool:
    """True while the process started at ``created`` as ``pid`` runs (not a zombie)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(run: BlockRun, timeout: float) -> list[tuple[int, float]]:
    """Wait up to ``timeout`` s for the processes the block started to end; those left."""
    deadline = time.monotonic() + timeout
    while True:
        left = [key for key in run.started if _alive(*key)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


def final_accuracy(folder: Path, rounds: int, clients: int) -> float:
    """The last test accuracy of the newest history.csv under ``folder``."""
    found = sorted(folder.rglob("history.csv"), key=lambda p: p.stat().st_mtime)
    assert found, f"no history.csv under {folder}"
    history = pd.read_csv(found[-1])
    assert list(history["round"]) == list(range(1, rounds + 1)), history
    assert (history["num_clients"] == clients).all(), history
    if "dropped_clients" in history:
        assert (history["dropped_clients"] == 0).all(), history
    return float(history["test_accuracy"].iloc[-1])


def report(name: str, run: BlockRun, accuracies: dict[str, float]) -> None:
    """One line for the test log: what the form took and reached (compare with the doc)."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nquick form {name}: {run.seconds:.0f} s wall, {run.cpu_seconds:.0f} s CPU in "
        f"{len(run.started)} processes, load average {load}, accuracy {accuracies}"
    )


def rounds_of(script: str) -> int:
    found = re.search(r"num-server-rounds=(\d+)", script)
    assert found, "the block sets no num-server-rounds"
    return int(found[1])


def test_offline_example(tmp_path: Path) -> None:
    """The example on Flower's simulation engine, two simulated SuperNodes."""
    form = quick_form("offline")
    script, ports = with_free_ports(form.script)
    assert "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" in ports, "the block uses Flower's default port"
    run = run_block(script, tmp_path, timeout=900)
    assert "[ROUND 1/" in run.output, run.output
    accuracy = final_accuracy(tmp_path / "flwr-quick", rounds_of(script), clients=2)
    report("offline", run, {"ms": accuracy})
    assert form.low <= accuracy <= form.high, run.output
    drop_checkpoints(tmp_path / "flwr-quick")
    assert any("flower-superlink" in name for name in run.started.values()), run.started


def test_deployment_on_loopback(tmp_path: Path) -> None:
    """A SuperLink and two SuperNodes on loopback, stopped by the PIDs the block saved."""
    form = quick_form("deployment")
    script, ports = with_free_ports(form.script)
    assert len(ports) == 3, f"a SuperLink port and one per SuperNode, got {ports}"
    run = run_block(script, tmp_path, timeout=900)
    accuracy = final_accuracy(tmp_path / "flwr-quick", rounds_of(script), clients=2)
    report("deployment", run, {"ms": accuracy})
    assert form.low <= accuracy <= form.high, run.output
    drop_checkpoints(tmp_path / "flwr-quick")
    names = list(run.started.values())
    assert sum("flwr-splitms-supernode" in n for n in names) == 2, names


def test_study(tmp_path: Path) -> None:
    """The study file on the local engine: every policy's final accuracy in the range."""
    form = quick_form("study")
    study_file = re.search(r"--config (\S+)", form.script)
    assert study_file and "--out ~/flwr-quick/" in form.script, form.script
    spec = tomllib.loads((ROOT / study_file[1]).read_text())
    run = run_block(form.script, tmp_path, timeout=900)
    out = tmp_path / "flwr-quick"
    rounds = spec["run-config"]["num-server-rounds"]
    accuracies = {
        policy: final_accuracy(next(out.rglob(f"runs/{policy}-*-s*")), rounds, clients=2)
        for policy in spec["study"]["policies"]
    }
    report("study", run, accuracies)
    summary = pd.read_csv(next(out.rglob("summary.csv")))
    assert sorted(summary["policy"]) == sorted(accuracies), summary
    for policy, accuracy in accuracies.items():
        assert form.low <= accuracy <= form.high, (policy, accuracies, run.output[-3000:])
    drop_checkpoints(out)


def test_the_readme_shows_the_same_quick_forms() -> None:
    """The README's copies of the quick forms are the blocks this file runs, with their ranges."""
    readme = (ROOT / "README.md").read_text()
    for name in ("offline", "deployment", "study"):
        pattern = rf"<!-- quick form: {name} -->\s*```bash\n(.*?)```"
        in_readme = re.search(pattern, readme, re.S)
        assert in_readme, f"README lost its quick form {name!r}"
        assert in_readme.group(1) == re.search(pattern, DOC.read_text(), re.S).group(1)  # type: ignore[union-attr]
        form = quick_form(name)
        after = readme[in_readme.end() :].split("<!-- quick form", 1)[0]
        stated = re.search(r"accuracy is between (\d+\.\d+) and (\d+\.\d+)", after)
        assert stated, f"README states no range after its quick form {name!r}"
        assert (float(stated[1]), float(stated[2])) == (form.low, form.high), name
