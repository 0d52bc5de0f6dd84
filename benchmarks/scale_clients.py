"""Many simulated SuperNodes: seconds per step, message cost per client, and peak memory.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/scale_clients.py                      # every row, both models
    nice .venv/bin/python benchmarks/scale_clients.py --models resnet18 --rows 10:10 1000:10
    nice .venv/bin/python benchmarks/scale_clients.py --quick              # one small row, ~1 min

A row ``N:S`` registers N simulated SuperNodes and samples S of them per round
(``fraction-train = S/N``). Models: ``resnet18`` is the example app
``examples/cifar100_resnet18`` as ``flwr run`` starts it (its ServerApp, with the memory check,
and its ClientApp), ResNet18 cut shallow, batch 8, MS uplink, raw downlink, synthetic data, 64
images per node; ``tabular`` is the MLP of ``examples/tabular_mlp`` (batch 32, a generated table
of 64 rows per node) under a ServerApp that samples. Each row runs Flower's simulation engine
(``flwr.simulation.run_simulation``) in a child process, in its own session, under a watchdog
that kills the child's process tree when its summed RSS passes ``--limit-gb`` (default 6) and
reports the row as killed; rounds 2.. are measured (round 1 builds models, data, Ray actors).

Columns (per step and per client message unless said otherwise):

* ``s/step``: round time / steps.
* ``msg s/client``: the strategy's ``message_seconds`` per step and sampled client: an
  exchange's wall time minus its slowest client handler. With clients queued on shared Ray
  actors this counts the *other* clients' handler time as messaging.
* ``handler``: a client handler's own time (forward, encode, backward, state round trip);
  ``of it build``: building the node's client half and reading its partition, the first time
  a process sees the node (each round samples mostly new nodes when N >> S).
* ``engine``: what a message costs beyond its handler: (exchange wall x actors - the handlers'
  sum) / messages (Ray transfer, scheduling, Flower's queues and polling).
* ``peak PSS``: peak proportional set size of the whole process tree (ServerApp process, Ray's
  processes and actors): the machine memory the run takes, shared pages split between their
  users. ``server RSS`` / ``actors RSS``: peak resident memory of the ServerApp process / the sum
  over the ClientApp actors. ``estimate``: what the example ServerApp's memory check estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ("resnet18", "tabular")
ROWS = ("10:10", "100:10", "100:100", "1000:10", "1000:100")


# -- the child: one row, in Flower's simulation engine -------------------------------------------


class ExchangeLog:
    """Per exchange of the strategy: wall seconds, replies, the sums of their handler seconds
    and of the seconds spent building a client half (first message of a node in a process)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, float, float]] = []
        self.actors = 0

    def install(self) -> None:
        """Wrap ``MSSplitStrategy.transport`` in this process (the benchmark's instrument)."""
        from flwr_splitms.protocol import BUILD_SECONDS, CLIENT_SECONDS, reply_metric
        from flwr_splitms.strategy import MSSplitStrategy
        from flwr_splitms.transport import Transport

        log = self

        class Counted(Transport):
            def exchange(self, messages):  # type: ignore[no-untyped-def]
                result = super().exchange(messages)
                if result.replies:
                    handlers = sum(
                        reply_metric(r, CLIENT_SECONDS, 0.0) for r in result.replies.values()
                    )
                    builds = sum(
                        reply_metric(r, BUILD_SECONDS, 0.0) for r in result.replies.values()
                    )
                    log.rows.append((result.seconds, len(result.replies), handlers, builds))
                    log.actors = log.actors or _ray_actors()
                return result

        def transport(strategy, grid):  # type: ignore[no-untyped-def]
            return Counted(
                grid, strategy.wait, poll_interval=strategy.poll_interval,
                drop_slow=strategy.drop_slow,
            )  # fmt: skip

        MSSplitStrategy.transport = transport  # type: ignore[method-assign]


def _ray_actors() -> int:
    """ClientApp actors Flower's Ray backend made (CPUs / CPUs per client)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0
    per_client = float(os.environ.get("SCALE_NUM_CPUS", "2"))
    return max(int(cpus // per_client), 1)


def _resnet_apps(spec: dict[str, Any], out: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The example app's ServerApp and ClientApp, with the row's run-config."""
    from flwr.app import Context
    from flwr.common.config import get_project_config
    from flwr.serverapp import ServerApp

    from flwr_splitms.client import make_client_app

    sys.path.insert(0, str(EXAMPLES / "cifar100_resnet18"))
    from cifar100_resnet18 import client_app as example_client
    from cifar100_resnet18 import server_app as example_server

    n, s = spec["registered"], spec["sampled"]
    defaults = get_project_config(EXAMPLES / "cifar100_resnet18")["tool"]["flwr"]["app"]["config"]
    run_config = {
        **defaults,
        "dataset": "synthetic",
        "num-classes": 10,
        "synthetic-size": 64 * n,
        "batch-size": 8,
        "fraction-train": min(1.0, s / n),
        "num-server-rounds": spec["rounds"],
        "steps-per-round": spec["steps"],
        "eval-max-examples": 64,
        "device": "cpu",
        "data-root": spec["data_root"],
        "output-dir": spec["output_dir"],
    }

    def with_config(context: Context) -> Context:
        return Context(
            run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
            state=context.state, run_config=run_config,
        )  # fmt: skip

    server = ServerApp()

    @server.main()
    def main(grid, context):  # type: ignore[no-untyped-def]
        example_server.main(grid, with_config(context))
        found = sorted(Path(spec["output_dir"]).rglob("history.csv"))
        out["history"] = str(found[-1]) if found else None

    client = make_client_app(
        lambda ctx: example_client.client_model(with_config(ctx)),
        lambda ctx: example_client.node_data(with_config(ctx)),
    )
    return server, client


def _tabular_apps(spec: dict[str, Any], out: dict[str, Any]):  # type: ignore[no-untyped-def]
    """The tabular example's ClientApp; a ServerApp like the example's that samples."""
    from flwr.app import Context
    from flwr.common.config import get_project_config
    from flwr.serverapp import ServerApp

    from flwr_splitms.client import make_client_app
    from flwr_splitms.data import from_torch_dataset
    from flwr_splitms.history import save_history
    from flwr_splitms.protocol import state_to_record
    from flwr_splitms.strategy import MSSplitStrategy

    sys.path.insert(0, str(EXAMPLES / "tabular_mlp"))
    from tabular_mlp import client_app as example_client
    from tabular_mlp.task import build

    n, s = spec["registered"], spec["sampled"]
    defaults = get_project_config(EXAMPLES / "tabular_mlp")["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, "num-rows": max(2000, 64 * n), "steps-per-round": spec["steps"]}

    def with_config(context: Context) -> Context:
        return Context(
            run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
            state=context.state, run_config=run_config,
        )  # fmt: skip

    server = ServerApp()

    @server.main()
    def main(grid, context):  # type: ignore[no-untyped-def]
        client_net, server_net, _, test = build(run_config)
        strategy = MSSplitStrategy(
            server_net, codec=str(run_config["codec"]),
            codec_params={"ratio": float(run_config["codec-ratio"])},
            lr=float(run_config["lr"]), batch_size=int(run_config["batch-size"]),
            steps_per_round=spec["steps"], seed=int(run_config["seed"]), augment=False,
            fraction_train=min(1.0, s / n), device="cpu",
        )  # fmt: skip
        result = strategy.start(
            grid, state_to_record(client_net.state_dict()), num_rounds=spec["rounds"],
            evaluate_fn=strategy.central_evaluator(client_net, from_torch_dataset(test)),
        )  # fmt: skip
        path = Path(spec["output_dir"]) / "history.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_history(result.history, path)
        out["history"] = str(path)

    client = make_client_app(
        lambda ctx: example_client.client_model(with_config(ctx)),
        lambda ctx: example_client.node_rows(with_config(ctx)),
    )
    return server, client


class _Capture(logging.Handler):
    """Keeps the example ServerApp's 'Memory: about ...' line."""

    def __init__(self, out: dict[str, Any]) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Memory: about"):
            self.out["estimate"] = message.split("Memory: about ", 1)[1].split(" for ", 1)[0]


def child(spec: dict[str, Any]) -> None:
    """Run one row and write its figures to ``spec["result"]``."""
    import pandas as pd
    from flwr.simulation import run_simulation

    os.environ["SCALE_NUM_CPUS"] = str(spec["num_cpus"])
    out: dict[str, Any] = {}
    logging.getLogger("flwr").addHandler(_Capture(out))
    exchanges = ExchangeLog()
    exchanges.install()
    make = _resnet_apps if spec["model"] == "resnet18" else _tabular_apps
    server, client = make(spec, out)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=spec["registered"],
        backend_config={"client_resources": {"num_cpus": spec["num_cpus"], "num_gpus": 0.0}},
    )
    if not out.get("history"):
        raise SystemExit("the run wrote no history.csv; see its log above")
    history = pd.read_csv(out["history"])
    measured = history[history["round"] >= 2]
    steps = float(measured["steps"].sum())
    clients = float(measured["num_clients"].mean())
    first = sum(1 + int(x) for x in history[history["round"] < 2]["steps"])  # round 1 exchanges
    rows = exchanges.rows[first:]
    messages = sum(r[1] for r in rows)
    handlers = sum(r[2] for r in rows)
    walls = sum(r[0] for r in rows)
    actors = exchanges.actors or 1
    result = {
        "s_step": float(measured["round_seconds"].sum()) / steps,
        "server_step": float(measured["server_seconds"].sum()) / steps,
        "msg_client": float(measured["message_seconds"].sum()) / steps / clients,
        "handler": handlers / max(messages, 1),
        "build": sum(r[3] for r in rows) / max(messages, 1),
        "engine": max(walls * actors - handlers, 0.0) / max(messages, 1),
        "actors": actors,
        "clients": clients,
        "estimate": out.get("estimate", ""),
    }
    Path(spec["result"]).write_text(json.dumps(result))


# -- the parent: rows under a watchdog ---------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(pid: int) -> None:
    """SIGKILL the child's session (its process group) and whatever of its tree is left."""
    import psutil

    procs = _tree(pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run_row(spec: dict[str, Any], limit_gb: float, timeout: float) -> dict[str, Any]:
    """Start the child for ``spec``; sample its tree's memory; kill it past the limit."""
    import psutil

    log_path = Path(spec["output_dir"]).parent / f"{spec['model']}-{spec['registered']}.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    peak = {"pss": 0, "rss": 0, "server": 0, "actors": 0}
    started, killed = time.monotonic(), ""
    try:
        while proc.poll() is None:
            rss = pss = actors = 0
            for p in _tree(proc.pid):
                try:
                    info = p.memory_full_info()
                    name = " ".join(p.cmdline()[:1])
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                if p.pid == proc.pid:
                    peak["server"] = max(peak["server"], info.rss)
                elif "ClientAppActor" in name:
                    actors += info.rss
            peak = {
                "pss": max(peak["pss"], pss), "rss": max(peak["rss"], rss),
                "server": peak["server"], "actors": max(peak["actors"], actors),
            }  # fmt: skip
            if rss > limit_gb * 2**30:
                killed = f"killed at {rss / 2**30:.1f} GB RSS"
                break
            if time.monotonic() - started > timeout:
                killed = f"killed after {timeout:.0f} s"
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
        proc.wait()
        for p in _tree(proc.pid):  # anything re-parented is gone with the session kill
            _kill_tree(p.pid)
    result: dict[str, Any] = {"seconds": time.monotonic() - started, "killed": killed}
    result.update({f"peak_{k}": v for k, v in peak.items()})
    result_path = Path(spec["result"])
    if not killed and proc.returncode == 0 and result_path.exists():
        result.update(json.loads(result_path.read_text()))
    elif not killed:
        result["killed"] = f"failed (exit {proc.returncode}; log {log_path})"
    return result


def machine_line() -> str:
    """CPU, cores, load, memory, versions: what a number needs next to it."""
    import flwr
    import psutil
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    memory = psutil.virtual_memory()
    return (
        f"{platform.processor() or platform.machine()}; {os.cpu_count()} cores; load average "
        f"{load}; {memory.total / 2**30:.0f} GB memory, {memory.available / 2**30:.1f} GB "
        f"available; torch {torch.__version__}; flwr {flwr.__version__}"
    )


COLUMNS = (
    "model", "N:S", "s/step", "server (s/step)", "msg s/client", "handler", "of it build", "engine",
    "peak PSS (GB)", "server RSS (GB)", "actors RSS (GB)", "estimate", "note",
)  # fmt: skip


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|"]
    for model, nodes, r in rows:
        if r.get("killed"):
            cells = ["", "", "", "", "", ""]
        else:
            cells = [
                f"{r['s_step']:.2f}", f"{r['server_step']:.2f}", f"{r['msg_client'] * 1e3:.0f} ms",
                f"{r['handler'] * 1e3:.0f} ms", f"{r['build'] * 1e3:.0f} ms",
                f"{r['engine'] * 1e3:.0f} ms",
            ]  # fmt: skip
        memory = [f"{r['peak_pss'] / 2**30:.2f}", f"{r['peak_server'] / 2**30:.2f}",
                  f"{r['peak_actors'] / 2**30:.2f}"]  # fmt: skip
        note = r.get("killed") or f"{r.get('actors', 1)} actor(s)"
        lines.append(
            "| " + " | ".join([model, nodes, *cells, *memory, r.get("estimate", ""), note]) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="N:S, registered:sampled")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="round 1 is the warm-up")
    parser.add_argument("--num-cpus", type=float, default=2.0, help="Ray CPUs per ClientApp")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="watchdog: tree RSS limit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    parser.add_argument("--quick", action="store_true", help="one row: resnet18 20:5, 2 steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.models, args.rows, args.steps = ["resnet18"], ["20:5"], 2
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 is the warm-up and is not reported")
    shapes = []
    for row in args.rows:
        try:
            n, s = (int(x) for x in row.split(":"))
        except ValueError:
            parser.error(f"--rows {row!r}: write registered:sampled, e.g. 1000:10")
        if not 1 <= s <= n:
            parser.error(f"--rows {row!r}: need 1 <= sampled <= registered")
        shapes.append((n, s))
    print(f"# scale_clients: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"machine: {machine_line()}", flush=True)
    done: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="scale-clients-") as work:
        for model in args.models:
            for n, s in shapes:
                folder = Path(work) / f"{model}-{n}-{s}"
                spec = {
                    "model": model, "registered": n, "sampled": s, "steps": args.steps,
                    "rounds": args.rounds, "num_cpus": args.num_cpus,
                    "data_root": str(Path(work) / "data"), "output_dir": str(folder / "out"),
                    "result": str(folder / "result.json"),
                }  # fmt: skip
                folder.mkdir(parents=True)
                result = run_row(spec, args.limit_gb, args.timeout)
                done.append((model, f"{n}:{s}", result))
                print(f"{model} {n}:{s}: done in {result['seconds']:.0f} s", flush=True)
                print(table(done), flush=True)
    print(f"\nmachine after: {machine_line()}")
    print(
        f"\n{args.steps} steps per round, rounds 2..{args.rounds} measured, "
        f"{args.num_cpus:g} Ray CPU(s) per ClientApp, watchdog at {args.limit_gb:g} GB RSS\n"
    )
    print(table(done))


if __name__ == "__main__":
    main()
