"""Are healthy simulated nodes kept when the machine is busy? Ten SuperNodes, both cores loaded.

Run by hand (not part of the tests)::

    .venv/bin/python benchmarks/busy_simulation.py               # 10 nodes, batch 64, 2 rounds
    .venv/bin/python benchmarks/busy_simulation.py --busy 0      # the same on a quiet machine

Starts ``--busy`` busy-loop processes of its own (one per core by default), then runs the example
app offline with ``flwr run`` on Flower's simulation engine (``--nodes`` SuperNodes on Ray,
synthetic data, ``--batch`` per step, ``--steps`` steps per round) with a private ``FLWR_HOME`` and
a free SuperLink port, so it runs beside anyone else's Flower. Prints the run's rounds: clients
trained, clients dropped, seconds, and the load average. Stops exactly the processes it started
(the busy loops and the local SuperLink that ``flwr run`` started), by PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from step_time import machine_line

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "cifar100_resnet18"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listener(port: int) -> psutil.Process | None:
    """The process of ours listening on ``port`` (the SuperLink ``flwr run`` started)."""
    for proc in psutil.process_iter(["pid"]):
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return proc
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy loops")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="busy-simulation-"))
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    size = args.nodes * args.batch * args.steps
    run_config = (
        f"dataset='synthetic' num-classes=10 synthetic-size={size} augment=false "
        f"num-server-rounds={args.rounds} steps-per-round={args.steps} "
        f"batch-size={args.batch} eval-max-examples=256 output-dir='{home / 'runs'}'"
    )
    command = [
        str(BIN / "flwr"), "run", str(APP), "--stream",
        "--federation-config", f"num-supernodes={args.nodes}", "--run-config", run_config,
    ]  # fmt: skip
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(5)  # let the load average see the busy loops
        load_before = os.getloadavg()[0]
        tic = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=home)
        seconds = time.perf_counter() - tic
        load_after = os.getloadavg()[0]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        superlink = listener(port)
        if superlink is not None:
            superlink.kill()
    if done.returncode != 0:
        print(done.stdout[-4000:] + done.stderr[-4000:])
        print(f"(the run's files are in {home})")
        return done.returncode
    history = pd.read_csv(next((home / "runs").glob("*/history.csv")))
    shutil.rmtree(home, ignore_errors=True)  # the run's checkpoints and weights: ~130 MB
    print(machine_line(torch.get_num_threads()))
    print(
        f"{args.nodes} simulated SuperNodes, batch {args.batch}, {args.steps} steps per round, "
        f"{args.busy} busy loop(s); 1-minute load {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end; flwr run took {seconds:.0f} s"
    )
    print("| round | clients trained | clients dropped | round seconds | test accuracy |")
    print("|---|---|---|---|---|")
    for row in history.itertuples():
        print(
            f"| {row.round} | {row.num_clients} | {row.dropped_clients} | "
            f"{row.round_seconds:.0f} | {row.test_accuracy:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
