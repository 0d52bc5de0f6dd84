"""Per-step time of a SplitFed training step: the local engine against Flower's simulation engine.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/step_time.py                # batch 8 and 64, 10 clients
    nice .venv/bin/python benchmarks/step_time.py --quick        # seconds-long smoke run

Setup: ResNet18 split at the shallow cut, MS uplink (ratio 0.99, 2 bits), raw float32 downlink,
synthetic 32x32 data, ``--clients`` clients, ``--steps`` steps per round. Round 1 is a warm-up
(model and data builds, Ray actor start, first-touch allocations); the table reports rounds 2..R.

Engines:

* ``local``: :func:`flwr_splitms.local.run_local`, one process, clients one after another.
* ``flower``: ``flwr.simulation.run_simulation`` in this process (the ServerApp thread runs
  ``MSSplitStrategy``; the ClientApps run in Ray actors, ``--num-cpus`` CPUs each). This is the
  engine ``flwr run --stream`` starts on a local SuperLink, without the SuperLink's own
  process hops.

Per-step columns (seconds): ``wall`` = round time / steps. ``client`` = sum over clients of the
client half (forward, encode, decode of the gradient, backward, SGD; for Flower the handler time
each ClientApp reports, which also holds its state round trip). ``client codec`` and
``server codec`` = encode/decode/serialisation time inside each half (for Flower the client
codec runs in the Ray actors and is measured there by a wrapper ClientApp). ``server`` = the
server half without its codec (decode, ``server_step``, gradient encode). ``messaging`` = the
strategy's ``message_seconds``: the wall time of each exchange minus the slowest client's
handler time (queues, polling, serialisation). ``other`` = wall - the critical path
(server + codec on the server + per-exchange slowest client + messaging; for the local engine
the clients run in turn, so all of ``client``). ``recomputed forwards``: share of the
batches whose backward had to recompute the forward because the process did not hold its live
autograd graph.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flwr_splitms import protocol as P
from flwr_splitms.client import SplitClient
from flwr_splitms.codecs import Codec, Payload
from flwr_splitms.codecs.downlink import MaskGradCodec, PayloadGradCodec
from flwr_splitms.config import SplitConfig
from flwr_splitms.core.client_half import SplitClientCore
from flwr_splitms.core.server_half import SplitServerCore

CODEC_TIME = "bench-client-codec-seconds"  # metrics the wrapper ClientApp adds to its replies
RECOMPUTED = "bench-recomputed-batches"


def machine_line(threads: int) -> str:
    """CPU model, cores, load, torch and flwr versions: what a timing needs next to it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    import flwr

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{model}; {os.cpu_count()} logical cores; load average {load}; torch "
        f"{torch.__version__} ({threads} intra-op thread(s)); flwr {flwr.__version__}; "
        f"Python {platform.python_version()}"
    )


class StepTimers:
    """Cumulative wall time spent in the client half, the server half and the codecs.

    Wraps the methods of the core classes in this process (class attributes, so every instance
    is timed). Codec time is attributed to the half that called it; nested codec calls (a
    gradient codec calling an activation codec, ``to_bytes`` inside ``encode``) count once.
    """

    HALVES: tuple[tuple[type, str, str], ...] = (
        (SplitClientCore, "forward", "client"),
        (SplitClientCore, "backward", "client"),
        (SplitServerCore, "run_block", "server"),
    )
    CODECS: tuple[tuple[type, str], ...] = (
        (Codec, "encode"),
        (Codec, "encode_measured"),
        (Codec, "decode"),
        (PayloadGradCodec, "encode"),
        (PayloadGradCodec, "decode"),
        (MaskGradCodec, "encode"),
        (MaskGradCodec, "decode"),
        (Payload, "to_bytes"),
        (Payload, "from_bytes"),
    )

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._half = "other"
        self._codec_depth = 0
        self._saved: list[tuple[type, str, Any]] = []

    def install(self) -> StepTimers:
        """Wrap the methods (undo with :meth:`uninstall`)."""
        for cls, name, half in self.HALVES:
            self._patch(cls, name, self._half_wrapper(half))
        for cls, name in self.CODECS:
            self._patch(cls, name, self._codec_wrapper)
        self._patch(SplitClientCore, "_recompute", self._counter("recomputed"))
        return self

    def uninstall(self) -> None:
        """Put the original methods back."""
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()

    def reset(self) -> None:
        """Forget what was measured so far (after a warm-up round)."""
        self.seconds.clear()

    def _patch(self, cls: type, name: str, make: Callable[[Callable[..., Any]], Any]) -> None:
        original = inspect.getattr_static(cls, name)
        self._saved.append((cls, name, original))
        if isinstance(original, classmethod):
            setattr(cls, name, classmethod(make(original.__func__)))
        else:
            setattr(cls, name, make(original))

    def _half_wrapper(self, half: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                outer, self._half = self._half, half
                tic = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[half] += time.perf_counter() - tic
                    self._half = outer

            return timed

        return make

    def _counter(self, key: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.seconds[key] += 1  # a count, kept with the times
                return fn(*args, **kwargs)

            return counted

        return make

    def _codec_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._codec_depth += 1
            tic = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._codec_depth -= 1
                if self._codec_depth == 0:
                    self.seconds[f"{self._half} codec"] += time.perf_counter() - tic

        return timed


@contextmanager
def timers_installed() -> Iterator[StepTimers]:
    """A :class:`StepTimers` wrapping the core for the duration of the block."""
    timers = StepTimers().install()
    try:
        yield timers
    finally:
        timers.uninstall()


def bench_config(args: argparse.Namespace, batch: int, data_root: str) -> SplitConfig:
    """The benchmark's run: ResNet18 shallow, MS uplink, raw downlink, synthetic data."""
    return SplitConfig(
        dataset="synthetic",
        data_root=data_root,
        num_classes=10,
        synthetic_size=args.clients * batch * args.steps,  # one epoch = one round
        arch="resnet18",
        cut="shallow",
        codec="ms",
        grad_codec=args.grad_codec,
        batch_size=batch,
        steps_per_round=args.steps,
        num_server_rounds=args.rounds,
        lr_schedule="constant",
        lr=0.05,
        seed=args.seed,
        device="cpu",
        fraction_evaluate=0.0,
        min_nodes=args.clients,
    )


def measure_local(config: SplitConfig, clients: int) -> dict[str, float]:
    """Per-step figures of the local engine, rounds 2..R."""
    from flwr_splitms import local
    from flwr_splitms.core.round import SplitRun

    original_round = SplitRun.round

    with timers_installed() as timers:

        def counted_round(self: SplitRun, clients: Any, server_round: int, num_rounds: int) -> Any:
            if server_round == 2:  # the warm-up round is over
                timers.reset()
            return original_round(self, clients, server_round, num_rounds)

        SplitRun.round = counted_round  # type: ignore[method-assign]
        try:
            result = local.run_local(config, clients, evaluate=False)
        finally:
            SplitRun.round = original_round  # type: ignore[method-assign]
        measured = result.history[result.history["round"] >= 2]
        steps = float(measured["steps"].sum())
        seconds = dict(timers.seconds)
    client_codec = seconds.get("client codec", 0.0)
    server_codec = seconds.get("server codec", 0.0)
    row = {
        "wall": float(measured["round_seconds"].sum()) / steps,
        "client": seconds.get("client", 0.0) / steps,
        "client codec": client_codec / steps,
        "server": (seconds.get("server", 0.0) - server_codec) / steps,
        "server codec": server_codec / steps,
        "messaging": 0.0,
        "critical client": seconds.get("client", 0.0) / steps,
        "client build": 0.0,
        "recomputed": seconds.get("recomputed", 0.0) / (steps * clients),
    }
    return row


def _split_client_app(config: SplitConfig) -> Any:
    """A ClientApp of the split protocol that also reports its codec time (for this benchmark).

    Runs in the Ray actors: the timers are installed there on the first message (the marker
    lives on the patched class, because this function's closure is unpickled per message).
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from flwr_splitms.experiment import build_split_model, client_data

    def model_fn(context: Context) -> torch.nn.Module:
        return build_split_model(config)[0]

    def data_fn(context: Context) -> Any:
        node = context.node_config
        return client_data(config, int(node["partition-id"]), int(node["num-partitions"]))

    split = SplitClient(model_fn, data_fn, device="cpu")
    app = ClientApp()

    def actor_timers() -> StepTimers:
        timers = getattr(SplitClientCore, "_bench_timers", None)
        if timers is None:
            timers = StepTimers().install()
            SplitClientCore._bench_timers = timers  # type: ignore[attr-defined]
        return timers

    def with_codec_time(handler: Callable[[Message, Context], Message]) -> Any:
        def handle(msg: Message, context: Context) -> Message:
            timers = actor_timers()
            before = timers.seconds.get("client codec", 0.0)
            recomputed = timers.seconds.get("recomputed", 0.0)
            reply = handler(msg, context)
            if not reply.has_error() and P.METRICS in reply.content.metric_records:
                spent = timers.seconds.get("client codec", 0.0) - before
                metrics = reply.content.metric_records[P.METRICS]
                metrics[CODEC_TIME] = spent
                metrics[RECOMPUTED] = timers.seconds.get("recomputed", 0.0) - recomputed
            return reply

        return handle

    app.train("split_begin")(with_codec_time(split.on_begin))
    app.train("split_step")(with_codec_time(split.on_step))
    app.train("split_end")(with_codec_time(split.on_end))
    return app


def measure_flower(config: SplitConfig, clients: int, num_cpus: float) -> dict[str, float]:
    """Per-step figures of Flower's simulation engine, rounds 2..R."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from flwr_splitms.experiment import build_split_model
    from flwr_splitms.strategy import MSSplitStrategy

    out: dict[str, Any] = {}
    client_sums: dict[str, float] = defaultdict(float)
    original_exchange = MSSplitStrategy._exchange

    def exchange(strategy: MSSplitStrategy, grid: Any, messages: Any, *a: Any, **kw: Any) -> Any:
        replies = original_exchange(strategy, grid, messages, *a, **kw)
        for reply in replies.values():
            metrics: Any = reply.content.metric_records.get(P.METRICS, {})
            client_sums["client"] += float(metrics.get(P.CLIENT_SECONDS, 0.0))
            client_sums["client codec"] += float(metrics.get(CODEC_TIME, 0.0))
            client_sums["client build"] += float(metrics.get(P.BUILD_SECONDS, 0.0))
            client_sums["recomputed"] += float(metrics.get(RECOMPUTED, 0.0))
        return replies

    server = ServerApp()

    with timers_installed() as timers:

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            client_net, server_net = build_split_model(config)
            strategy = MSSplitStrategy.from_config(config, server_net)

            def after(server_round: int, *_: Any) -> None:
                if server_round == 1:
                    timers.reset()
                    client_sums.clear()

            strategy.round_callbacks.append(after)
            from flwr_splitms.protocol import state_to_record

            strategy.start(
                grid,
                state_to_record(client_net.state_dict()),
                num_rounds=config.num_server_rounds,
                timeout=600,
            )
            out["history"] = strategy.history

        MSSplitStrategy._exchange = exchange  # type: ignore[assignment,method-assign]
        try:
            run_simulation(
                server_app=server,
                client_app=_split_client_app(config),
                num_supernodes=clients,
                backend_config={"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0}},
            )
        finally:
            MSSplitStrategy._exchange = original_exchange  # type: ignore[method-assign]
        seconds = dict(timers.seconds)
    if "history" not in out:
        raise RuntimeError("the Flower run did not finish; see its log above")
    history = out["history"]
    measured = history[history["round"] >= 2]
    steps = float(measured["steps"].sum())
    server_codec = seconds.get("server codec", 0.0)
    return {
        "wall": float(measured["round_seconds"].sum()) / steps,
        "client": client_sums["client"] / steps,
        "client codec": client_sums["client codec"] / steps,
        "server": (seconds.get("server", 0.0) - server_codec) / steps,
        "server codec": server_codec / steps,
        "messaging": float(measured["message_seconds"].sum()) / steps,
        "critical client": float(measured["client_seconds"].sum()) / steps,
        "client build": client_sums["client build"] / steps,
        "recomputed": client_sums["recomputed"] / (steps * clients),
    }


ENGINES = ("local", "flower")
COLUMNS = (
    "wall",
    "client",
    "client build",
    "client codec",
    "server",
    "server codec",
    "messaging",
    "other",
)


def table(rows: list[tuple[int, str, dict[str, float]]]) -> str:
    """Markdown table of the per-step figures, with Flower / local per batch size."""
    lines = [
        "| batch | engine | "
        + " | ".join(f"{c} (s)" for c in COLUMNS)
        + " | Flower / local | recomputed forwards |",
        "|---:|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    local_wall = {batch: r["wall"] for batch, engine, r in rows if engine == "local"}
    for batch, engine, r in rows:
        critical = r["critical client"] + r["server"] + r["server codec"] + r["messaging"]
        values = {**r, "other": r["wall"] - critical}
        ratio = ""
        if engine != "local" and batch in local_wall:
            ratio = f"{r['wall'] / local_wall[batch]:.2f}x"
        cells = " | ".join(f"{values[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {batch} | {engine} | {cells} | {ratio} | {r['recomputed']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="round 1 is the warm-up")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--grad-codec", default="none")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (local)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 clients, batch 4, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.clients, args.steps = [4], 2, 2
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 is the warm-up and is not reported")
    unknown = set(args.engines) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    torch.set_num_threads(args.threads)
    print(f"# step_time: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"machine: {machine_line(args.threads)}")
    rows = []
    with tempfile.TemporaryDirectory() as data_root:
        for batch in args.batches:
            config = bench_config(args, batch, data_root)
            for engine in args.engines:
                tic = time.perf_counter()
                if engine == "local":
                    row = measure_local(config, args.clients)
                else:
                    row = measure_flower(config, args.clients, args.num_cpus)
                print(
                    f"batch {batch} {engine}: {row['wall']:.3f} s/step "
                    f"(run took {time.perf_counter() - tic:.0f} s)",
                    flush=True,
                )
                rows.append((batch, engine, row))
                print(table(rows), flush=True)  # so far (a long run can be stopped early)
    print(f"\nmachine after: {machine_line(args.threads)}")
    print(
        f"\nResNet18 shallow, {args.clients} clients, MS 0.99/2 bits up, grad codec "
        f"{args.grad_codec}, {args.steps} steps/round, rounds 2..{args.rounds}; "
        f"Flower = run_simulation, {args.num_cpus:g} CPU per ClientApp\n"
    )
    print(table(rows))
    if any(math.isnan(r["wall"]) for _, _, r in rows):
        raise SystemExit("a run produced no steps")


if __name__ == "__main__":
    main()
