"""Start a Flower deployment on loopback and stop exactly what was started, by PID.

Shared by the end-to-end tests and ``benchmarks/deployment_latency.py``. Everything runs with a
private ``FLWR_HOME`` and free ports, so it never touches a user's own SuperLink, and stopping
walks the process tree of each PID started here (a SuperNode's ``flower-superexec`` and its
``flwr-clientapp`` children, a SuperLink's ``flwr-serverapp``), never processes found by name.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import httpx
import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower processes: private home, private local-SuperLink ports.

    ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` runs apps in this venv instead of a
    fresh ``uv`` environment per run (offline, and seconds instead of minutes).
    """
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def stop_tree(pid: int, timeout: float = 15.0, *, kill: bool = False) -> None:
    """Stop process ``pid`` and all its descendants: SIGTERM, then SIGKILL after ``timeout``.

    ``kill=True`` sends SIGKILL at once (a machine that vanished, no goodbye to the SuperLink).
    The descendants are listed before the parent is signalled: once it is gone they are
    re-parented and could no longer be found from it.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:  # the parent first, so that it does not start new children
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill() if kill else proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=0 if kill else timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def listening_pid(port: int) -> int | None:
    """The PID of this user's process listening on ``port`` of 127.0.0.1, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def stop_local_superlink(env: Mapping[str, str]) -> None:
    """Stop the detached local SuperLink that ``flwr run`` started for ``env``'s ports.

    ``flwr run APP`` on the simulation engine starts a SuperLink in its own session that
    outlives the command; it is found by the private port ``flower_env`` gave it.
    """
    for key in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
        pid = listening_pid(int(env[key]))
        if pid is not None:
            stop_tree(pid)


def superlink_healthy(port: int) -> bool:
    """True when a SuperLink answers on ``port``."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


class Deployment:
    """One SuperLink and any number of SuperNodes on loopback, stopped by PID on exit.

    >>> with Deployment(tmp_path, env) as dep:  # doctest: +SKIP
    ...     dep.start_superlink()
    ...     dep.start_supernodes(2)
    ...     dep.wait_ready()
    ...     dep.flwr_run(app_dir, run_config)
    """

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.templates: list[str] = []  # logs that show a flwr-splitms-superexec template start
        self.port = 0

    def __enter__(self) -> Deployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self, name: str, *argv: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (a Flower command in this venv) with its output in ``logs/NAME.log``.

        ``env``: variables set for this process (and its children) on top of the deployment's.
        """
        with (self.logs / f"{name}.log").open("ab") as handle:
            proc = subprocess.Popen(
                [str(BIN / argv[0]), *argv[1:]],
                env={**self.env, **(env or {})},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self.procs[name] = proc
        return proc

    def start_superlink(self, env: Mapping[str, str] | None = None) -> int:
        """Start ``flower-superlink`` (Fleet, Control, Runtime APIs on one port) and name it.

        ``env``: extra variables for the SuperLink and the ServerApp processes it starts.
        """
        self.port = free_port()
        self.start(
            "superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
            "--port", str(self.port), env=env,
        )  # fmt: skip
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "deployment"\n\n'
            f'[superlink.deployment]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        return self.port

    def start_supernode(
        self, partition_id: int, num_partitions: int, *, warm: bool = False, tuned: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start SuperNode ``supernode<partition_id>`` holding that partition of the data.

        ``warm``: the node runs with ``--isolation process`` beside ``flwr-splitms-superexec``
        (``superexec<partition_id>``), which forks ClientApp tasks from a preloaded template.
        ``tuned``: ``flwr-splitms-supernode`` instead of ``flower-supernode`` (short idle poll;
        with ``warm`` off it starts ``flwr-splitms-superexec`` itself).
        """
        runtime_port = free_port()
        node = self.start(
            f"supernode{partition_id}",
            "flwr-splitms-supernode" if tuned else "flower-supernode", "--insecure",
            "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}",
            "--port", str(runtime_port),
            *(["--isolation", "process"] if warm else []),
        )  # fmt: skip
        if warm:
            self.start(
                f"superexec{partition_id}", "flwr-splitms-superexec", "--insecure",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}",
                "--parent-pid", str(node.pid),
            )  # fmt: skip
        if warm or tuned:
            self.templates.append(
                f"superexec{partition_id}" if warm else f"supernode{partition_id}"
            )
        return node

    def start_supernodes(self, count: int, *, warm: bool = False, tuned: bool = False) -> None:
        """Start ``count`` SuperNodes with partitions ``0..count-1``."""
        for i in range(count):
            self.start_supernode(i, count, warm=warm, tuned=tuned)

    def tree(self) -> list[int]:
        """PIDs of every process started here and of all their descendants, now."""
        return [
            proc.pid
            for p in self.procs.values()
            for proc in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        ]

    def log(self, name: str) -> str:
        """The output of process ``name`` so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, chars: int = 3000) -> str:
        """The end of every log, for failure messages."""
        return "".join(
            f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.iterdir())
        )

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll ``ready`` until true; TimeoutError with every log's tail otherwise."""
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "timed out"
                raise TimeoutError(f"{why} waiting for {what}:{self.tails()}")
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait until the SuperLink answers and every SuperNode has registered."""
        self.wait_for(lambda: superlink_healthy(self.port), "the SuperLink", timeout)
        for name in [n for n in self.procs if n.startswith("supernode")]:
            self.wait_for(self._registered(name), f"{name} to register", timeout)
        for name in self.templates:
            self.wait_for(self._template_ready(name), f"{name}'s SuperExec template", timeout)

    def _template_ready(self, name: str) -> Callable[[], bool]:
        return lambda: "template PID" in self.log(name)

    def _registered(self, name: str) -> Callable[[], bool]:
        return lambda: "SuperNode ID" in self.log(name)

    def flwr_run(
        self, app: Path, run_config: str, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run APP deployment --stream --run-config ...``; waits for the run's end."""
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "deployment", "--stream",
             "--run-config", run_config],
            env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
        )  # fmt: skip

    def stop(self, name: str, *, kill: bool = False) -> None:
        """Stop process ``name`` and its children (``kill``: SIGKILL, no clean shutdown)."""
        proc = self.procs.pop(name)
        stop_tree(proc.pid, kill=kill)
        proc.wait(timeout=5)

    def stop_all(self) -> None:
        """Stop the SuperNodes, then the SuperLink, each with its process tree."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            self.stop(name)


def run_config_string(settings: Mapping[str, object]) -> str:
    """``key=value`` pairs for ``--run-config`` (strings quoted as TOML wants)."""
    return " ".join(
        f"{k}='{v}'"
        if isinstance(v, str)
        else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in settings.items()
    )
