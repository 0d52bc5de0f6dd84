"""What one split-learning message costs in a real Flower deployment, broken down.

Run by hand (minutes)::

    .venv/bin/python benchmarks/deployment_latency.py            # 2 SuperNodes, K = 1 and 8
    .venv/bin/python benchmarks/deployment_latency.py --nodes 3 --settings warm

It starts a SuperLink and N SuperNodes on loopback (private ``FLWR_HOME``, free ports, runtime
dependency installation off), runs ``benchmarks/deployment_app`` (the example's ResNet18 split,
shallow cut, batch 16, synthetic data) once per ``steps-per-message`` K, and stops every process
it started by PID, also on Ctrl-C or an error. ``--settings`` picks the deployments compared:
Flower's own SuperExec with its default task poll (1 s, ``default``) or with
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05`` (``fast``), and SuperNodes with ``--isolation process``
beside ``flwr-splitms-superexec``, which forks each ClientApp task from a template process that
imported torch, Flower and flwr-splitms once (``warm``), and ``flwr-splitms-supernode``, which
does the same and also bounds the SuperNode's idle poll to 0.2 s (``tuned``).

Where each number comes from (all stamps are wall-clock times on this one machine):

* server push       -- ServerApp: ``push_messages`` call to its return.
* SuperNode poll    -- push returned -> the SuperNode logs "Received" (its idle loop sleeps 3 s
                       between pulls, at most 0.2 s with flwr-splitms-supernode; includes pulling
                       the message's objects). Negative where a node had its message before the
                       push of every node's message returned.
* SuperExec launch  -- "Received" -> the ``flwr-clientapp`` process exists (SuperExec's task poll,
                       ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, default 1 s, plus fork/exec).
* start+flwr import -- process created -> it logs "Start `flwr-clientapp` process" (interpreter
                       start and Flower's imports; a fork of the template has done both).
* pull task         -- -> "Start FAB installation" (message, context and bundle from the SuperNode).
* bundle install    -- "Start FAB installation" -> "Start ClientApp Loading".
* app import        -- importing the app module (torch, torchvision, flwr_splitms): measured
                       inside the process (``client_app.py`` stamps before and after).
* app build         -- model and data built in this process (``build-seconds``).
* handler           -- the handler minus the build (forward/backward, codec, reading and writing
                       ``context.state``; its size is printed as "state KB").
* reply to SuperNode-- handler end -> the SuperNode logs "Sending" (pushing reply and context,
                       process exit, the SuperNode's 0.5 s reply poll). Derived.
* to server         -- "Sending" -> the ServerApp pulled the reply (SuperNode -> SuperLink, the
                       ServerApp's pull loop). Derived.
* server compute    -- ServerApp time between exchanges (server half steps, codecs, messages).

Columns are medians over the nodes' messages after the first of each run (the first message
builds the model and data); "message" is push-to-last-reply per exchange (median), and "per
step" is the run's training time divided by its steps, the number the targets are about
(K = 1: <= 6 s; K = 8: <= 1.5 s amortized).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flower_processes import Deployment, flower_env, run_config_string  # noqa: E402

APP = Path(__file__).resolve().parent / "deployment_app"
#: Deployment settings: (SuperNode command, SuperExec, FLWR_SUPEREXEC_TASK_POLL_INTERVAL or None).
SETTINGS = {
    "default": ("flower-supernode", "flower-superexec", None),
    "fast": ("flower-supernode", "flower-superexec", "0.05"),
    "warm": ("flower-supernode --isolation process", "flwr-splitms-superexec", None),
    "tuned": ("flwr-splitms-supernode", "flwr-splitms-superexec", None),
}
_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})(.*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
COLUMNS = (
    ("server push", "push"),
    ("SuperNode poll", "node-poll"),
    ("SuperExec launch", "launch"),
    ("start+flwr import", "start"),
    ("pull task", "pull"),
    ("bundle install", "install"),
    ("app import", "import"),
    ("app build", "build"),
    ("handler", "handler"),
    ("reply to SuperNode", "reply"),
    ("to server", "deliver"),
    ("server compute", "server"),
)


def node_events(*logs: str) -> list[dict[str, float]]:
    """Per message a SuperNode handled, the stamps of its log lines (needs FLWR_LOG_LEVEL=DEBUG).

    ``logs``: the SuperNode's log and, with ``flwr-splitms-superexec``, that SuperExec's log
    (where its forked ClientApp processes write); their lines are merged in time order.
    """
    lines: list[tuple[float, str]] = []
    for log in logs:
        for raw in log.splitlines():
            match = _LINE.search(_ANSI.sub("", raw))
            if match:
                stamp = datetime.strptime(match.group(2), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                lines.append((stamp, match.group(3)))
    lines.sort(key=lambda line: line[0])
    events: list[dict[str, float]] = []
    for stamp, text in lines:
        if "Receiving:" in text and "split" in text:
            events.append({"received": stamp})
        elif events and "Start `flwr-clientapp` process" in text:
            events[-1].setdefault("clientapp", stamp)
        elif events and "Start FAB installation" in text:
            events[-1].setdefault("fab", stamp)
        elif events and "Start `ClientApp` Loading" in text:
            events[-1].setdefault("loading", stamp)
        elif events and "Sending:" in text:
            events[-1].setdefault("sending", stamp)
    return events


def _match(events: list[dict[str, float]], handler_start: float) -> dict[str, float]:
    """The SuperNode's record of the message whose handler started at ``handler_start``."""
    before = [e for e in events if e["received"] <= handler_start]
    return before[-1] if before else {}


def breakdown(timing: dict[str, Any], logs: dict[int, list[dict[str, float]]]) -> dict[str, float]:
    """Median seconds per component over the run's messages (first message of a node left out)."""
    parts: dict[str, list[float]] = {key: [] for _, key in COLUMNS}
    parts["message"], parts["first"] = [], []
    exchanges = timing["exchanges"]
    previous_return = timing["started"]
    seen: set[int] = set()
    for exchange in exchanges:
        parts["server"].append(exchange["entered"] - previous_return)
        previous_return = exchange["returned"]
        last = max((r["arrived"] for r in exchange["replies"].values()), default=exchange["pushed"])
        parts["message"].append(last - exchange["entered"])
        for reply in exchange["replies"].values():
            cid = int(reply.get("client-id", -1))
            if cid not in seen:
                seen.add(cid)
                parts["first"].append(reply["arrived"] - exchange["entered"])
                continue
            log = _match(logs.get(cid, []), reply["bench.handler-start"])
            handler = reply["bench.handler-end"] - reply["bench.handler-start"]
            parts["push"].append(exchange["pushed"] - exchange["entered"])
            parts["import"].append(reply["bench.import-end"] - reply["bench.import-start"])
            parts["build"].append(reply["build-seconds"])
            parts["handler"].append(handler - reply["build-seconds"])
            if {"received", "clientapp", "fab", "loading", "sending"} <= set(log):
                parts["node-poll"].append(log["received"] - exchange["pushed"])
                parts["launch"].append(reply["bench.created"] - log["received"])
                parts["start"].append(log["clientapp"] - reply["bench.created"])
                parts["pull"].append(log["fab"] - log["clientapp"])
                parts["install"].append(log["loading"] - log["fab"])
                parts["reply"].append(log["sending"] - reply["bench.handler-end"])
                parts["deliver"].append(reply["arrived"] - log["sending"])
    steps = sum(int(row.get("steps", 0)) for row in timing["history"])
    train = exchanges[-1]["returned"] - exchanges[0]["entered"] if exchanges else float("nan")
    out = {k: statistics.median(v) if v else float("nan") for k, v in parts.items()}
    out["per step"] = train / max(steps, 1)
    out["steps"] = float(steps)
    out["exchanges"] = float(len(exchanges))
    states = [r.get("bench.state-bytes", 0.0) for e in exchanges for r in e["replies"].values()]
    out["state KB"] = max(states, default=0.0) / 1e3
    return out


def run_setting(
    setting: str, ks: list[int], args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    """Start a deployment in ``setting`` (see SETTINGS); one run per K; stop it."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = {"FLWR_LOG_LEVEL": "DEBUG"}
    _, _, poll = SETTINGS[setting]
    if poll is not None:
        extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = poll
    env = flower_env(workdir / "flwr-home", **extra)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    rows = []
    with Deployment(workdir, env) as dep:
        threads = str(args.server_threads or args.threads)
        dep.start_superlink(env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        dep.start_supernodes(args.nodes, warm=setting == "warm", tuned=setting == "tuned")
        dep.wait_ready()
        for k in ks:
            steps = max(args.steps, 2 * k)
            timing_file = workdir / f"timing-{setting}-{k}.json"
            config = run_config_string(
                {
                    "synthetic-size": args.synthetic_size,
                    "data-root": str(workdir / "data"),
                    "steps-per-round": steps,
                    "steps-per-message": k,
                    "min-nodes": args.nodes,
                    "timing-file": str(timing_file),
                }
            )
            config = " ".join([config, *args.set])
            tic = time.monotonic()
            done = dep.flwr_run(APP, config, timeout=args.timeout)
            wall = time.monotonic() - tic
            if done.returncode != 0 or not timing_file.exists():
                raise RuntimeError(f"run K={k} failed:\n{done.stdout}{done.stderr}{dep.tails()}")
            timing = json.loads(timing_file.read_text())
            logs = {
                i: node_events(dep.log(f"supernode{i}"), dep.log(f"superexec{i}"))
                for i in range(args.nodes)
            }
            row = breakdown(timing, logs)
            rows.append({"setting": setting, "K": k, "flwr run s": wall, **row})
            print(f"  done: {setting} K={k} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """Markdown table: one row per (setting, K), seconds unless named otherwise."""
    heads = ["SuperNode", "SuperExec", "task poll", "K", "per step", "message", "first msg"]
    heads += [name for name, _ in COLUMNS] + ["state KB"]
    keys = ["node", "exec", "poll", "K", "per step", "message", "first"]
    keys += [k for _, k in COLUMNS] + ["state KB"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---" for _ in heads) + "|")
    for row in rows:
        cells = []
        node, superexec, poll = SETTINGS[row["setting"]]
        names = {"node": node, "exec": superexec, "poll": poll or "1 (default)"}
        if superexec.startswith("flwr-splitms"):
            names["poll"] = "0.05 (its default)"
        for key in keys:
            value = names[key] if key in names else row[key]
            cells.append(f"{value:.2f}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (default 2)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 8], help="steps-per-message")
    parser.add_argument("--steps", type=int, default=4, help="steps per round (>= 2K is used)")
    parser.add_argument("--synthetic-size", type=int, default=5000)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=sorted(SETTINGS),
        default=["default", "fast", "warm", "tuned"],
        help="default/fast: Flower's SuperNode and SuperExec, task poll 1 s or 0.05 s; warm: "
        "flower-supernode --isolation process beside flwr-splitms-superexec (ClientApp tasks "
        "forked from a preloaded template); tuned: flwr-splitms-supernode (warm SuperExec and "
        "a 0.2 s idle poll)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per ClientApp")
    parser.add_argument(
        "--server-threads", type=int, help="torch threads of the ServerApp (default: --threads)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="more run-config, e.g. --set grad-codec='\"fp16\"' (TOML values)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and timing files here (default: a temp folder)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(
        f"# {args.nodes} SuperNodes on loopback, ResNet18 shallow, batch 16, synthetic "
        f"{args.synthetic_size} images; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; torch threads: "
        f"{args.threads} per client, {args.server_threads or args.threads} server; "
        f"run-config: {' '.join(args.set) or 'the defaults'}",
        file=sys.stderr,
    )
    rows: list[dict[str, Any]] = []
    for setting in args.settings:
        if args.workdir:
            rows += run_setting(setting, args.k, args, args.workdir / setting)
            continue
        with tempfile.TemporaryDirectory(prefix="flwr-bench-") as tmp:
            rows += run_setting(setting, args.k, args, Path(tmp))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
