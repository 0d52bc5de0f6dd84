"""Start a Ray cluster of several nodes on this machine and stop exactly what was started, by PID.

Used by ``test_ray_cluster.py``. Every node is a ``ray start --block`` process with its own short
temp dir (Ray's unix sockets live under it, and their paths may not exceed 107 bytes) and a free
port for every port Ray opens: GCS, node manager, object manager, a range for the workers, the
dashboard agent, metrics, the runtime-env agent and, on the head, the client server; the
dashboard is off. So the cluster never meets another user's Ray. In particular it never writes
``/tmp/ray/ray_current_cluster``: ``ray.init()`` without an address attaches to the cluster named
there, so a head started with Ray's default temp dir would capture every Flower simulation the
machine's user starts.

Stopping walks each ``ray start`` process tree (GCS, raylet, agents, workers; the head last),
then ends any process that still carries this cluster's marker in its environment (every process
of a node inherits the environment of its ``ray start``) and reports it, so a test can assert
that nothing outlived the cluster. ``ray stop`` is never used: it stops every Ray process of the
machine's user.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import psutil
from flower_processes import BIN, free_port, stop_tree

MARKER = "SPLITMS_TEST_RAY_CLUSTER"  # in the environment of every process of the cluster
NODE_NAME = "SPLITMS_TEST_RAY_NODE"  # the name given to the node, for its processes to read
STARTED = "Ray runtime started."  # what `ray start` logs once its node is up
WORKER_PORTS = 24  # ports in each node's worker range (one per Ray worker process)


class RayStartError(RuntimeError):
    """A ``ray start`` exited or did not report its node up in time (the message has its log)."""


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive TCP ports that are all free right now."""
    for _ in range(200):
        first = random.randint(20000, 30000)  # below Linux's ephemeral range (32768-60999)
        if all(_port_is_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"found no {count} consecutive free ports in 20000-30000")


class RayCluster:
    """A head node and any number of worker nodes on this machine, stopped by PID on exit.

    >>> with RayCluster(tmp_path / "ray-logs") as cluster:  # doctest: +SKIP
    ...     cluster.start_head()
    ...     cluster.add_node("worker")
    ...     subprocess.run(..., env={**env, "RAY_ADDRESS": cluster.address})

    ``env``: extra variables for every node (its raylet and the workers it starts see them).
    """

    def __init__(self, logs: Path, env: Mapping[str, str] | None = None) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        # Short, private: /tmp/rcXXXXXXXX/<node>/session_<date>_<pid>/sockets/plasma_store
        self.temp_root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.env = {**os.environ, **(env or {}), MARKER: str(self.temp_root)}
        self.env.pop("RAY_ADDRESS", None)  # a node joins the cluster its --address names
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.gcs_port: int | None = None
        self.leftovers: list[str] = []

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The GCS address to join or attach to (``RAY_ADDRESS``); Ray resolves 127.0.0.1 to
        the machine's own IP, where its processes listen."""
        if self.gcs_port is None:
            raise RuntimeError("start_head() first")
        return f"127.0.0.1:{self.gcs_port}"

    def start_head(self, name: str = "head", num_cpus: int = 1, timeout: float = 180) -> str:
        """Start the head node (GCS and a raylet) and wait until it is up; its address."""
        self.gcs_port = free_port()
        self._start(
            name,
            ["--head", "--port", str(self.gcs_port), "--include-dashboard=false",
             "--dashboard-port", str(free_port()),
             "--ray-client-server-port", str(free_port())],
            num_cpus, timeout,
        )  # fmt: skip
        return self.address

    def add_node(self, name: str, num_cpus: int = 1, timeout: float = 180) -> None:
        """Start a worker node that joins the head, and wait until it is up."""
        self._start(name, ["--address", self.address], num_cpus, timeout)

    def _start(self, name: str, role: list[str], num_cpus: int, timeout: float) -> None:
        temp_dir = self.temp_root / name
        first_worker_port = free_port_range(WORKER_PORTS)
        argv = [
            str(BIN / "ray"), "start", *role, "--block", "--disable-usage-stats",
            "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(100 * 1024**2),
            "--temp-dir", str(temp_dir),
            "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()),
            "--min-worker-port", str(first_worker_port),
            "--max-worker-port", str(first_worker_port + WORKER_PORTS - 1),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
        ]  # fmt: skip
        log = self.logs / f"{name}.log"
        with log.open("ab") as handle:
            self.nodes[name] = subprocess.Popen(
                argv, env={**self.env, NODE_NAME: name}, stdout=handle, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while STARTED not in self.log(name):
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                why = "exited" if self.nodes[name].poll() is not None else f"not up in {timeout} s"
                raise RayStartError(
                    f"`ray start` of node {name!r} {why}:\n{self.log(name)[-3000:]}"
                )
            time.sleep(0.5)

    def log(self, name: str) -> str:
        """The output of node ``name``'s ``ray start`` so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tree(self) -> list[int]:
        """PIDs of every ``ray start`` process started here and of all their descendants, now."""
        pids = []
        for proc in self.nodes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(proc.pid)
                pids += [root.pid, *(child.pid for child in root.children(recursive=True))]
        return pids

    def marked(self) -> list[psutil.Process]:
        """This user's processes whose environment carries this cluster's marker."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARKER) == str(self.temp_root):
                    found.append(proc)
        return found

    def stop(self) -> None:
        """Stop every node's process tree (workers first, the head last); then end and record,
        in ``leftovers``, any process that still carries the marker; remove the temp dir."""
        head_last = sorted(self.nodes, key=lambda name: name == "head")
        for name in head_last:
            proc = self.nodes.pop(name)
            stop_tree(proc.pid, timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        survivors = self.marked()
        for proc in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.leftovers.append(f"{proc.pid} {proc.name()} {proc.cmdline()[:3]}")
                proc.kill()
        psutil.wait_procs(survivors, timeout=5)
        shutil.rmtree(self.temp_root, ignore_errors=True)
