"""What several steps per message cost in accuracy: K = 1, 2, 4, 8, 16 on the local engine.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/steps_per_message.py                   # the recorded table
    nice .venv/bin/python benchmarks/steps_per_message.py --arch resnet18   # the paper's model
    nice .venv/bin/python benchmarks/steps_per_message.py --quick           # smoke run

With ``steps-per-message`` = K a client forwards K batches at the same weights and applies the
K gradients one message later, so batch j of a block (j = 0..K-1) gets a parameter gradient taken
at weights j updates old (K = 1 is the exact algorithm). Every K runs the same seeds, data order
and number of steps (``--rounds`` x ``--steps-per-round``) with MS 0.99/2 bits on the uplink;
the bytes per step are therefore the same for every K and only the accuracy differs. The
default model is ``small-cnn`` (:func:`small_cnn`): 20 M multiply-adds per image against
ResNet18's 555 M, so that 15 runs fit on a shared CPU; ``--arch resnet18`` trains ResNet18.

Columns: final test accuracy and training loss (mean and, with several seeds, the sample standard
deviation), the accuracy change against K = 1, and the traffic to accuracy: total bytes (uplink
+ downlink) until the test accuracy first reaches K = 1's final accuracy of the same seed
(``flwr_splitms.history.traffic_to_accuracy``; evaluation after every round, so the resolution
is one round; "never" when a run does not reach it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import pandas as pd
import torch
from step_time import machine_line
from torch import nn

from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import client_data, evaluation_data
from flwr_splitms.history import traffic_to_accuracy
from flwr_splitms.local import run_local

ARCHS = ("small-cnn", "resnet18")


def small_cnn(num_classes: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """A split CNN with 28x fewer multiply-adds per image than ResNet18, for studies on a CPU.

    The client half ends like ResNet18's shallow cut: a 32-channel 32x32 ReLU feature map per
    image (ResNet18's has 64 channels), so MS and the gradient codecs see the same kind of
    sparse non-negative activations. The server half holds the rest (two conv blocks, a
    linear classifier).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        client = nn.Sequential(*block(3, 32), *block(32, 32))
        server = nn.Sequential(
            nn.MaxPool2d(2),
            *block(32, 64),
            nn.MaxPool2d(2),
            *block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, num_classes),
        )
    return client, server


def train(config: SplitConfig, clients: int, arch: str, evaluate: bool = True) -> pd.DataFrame:
    """History of a local-engine run of ``config`` with ``arch`` (``small-cnn`` or the config's)."""
    if arch == "resnet18":
        return run_local(config, clients, evaluate=evaluate).history
    return run_local(
        config,
        clients,
        evaluate=evaluate,
        models=small_cnn(10, config.seed),
        client_data=[client_data(config, c, clients)[0] for c in range(clients)],
        test_data=evaluation_data(config) if evaluate else None,
    ).history


def base_config(args: argparse.Namespace, data_root: str) -> SplitConfig:
    """The run every K shares: ResNet18 shallow on synthetic data, MS uplink, raw downlink."""
    return SplitConfig(
        dataset="synthetic",
        data_root=data_root,
        num_classes=10,
        synthetic_size=args.synthetic_size,
        arch="resnet18",
        cut="shallow",
        codec="ms",
        batch_size=args.batch,
        steps_per_round=args.steps_per_round,
        num_server_rounds=args.rounds,
        lr=args.lr,
        lr_schedule="constant",
        eval_max_examples=args.eval_examples,
        device="cpu",
    )


def mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean`` or ``mean ± sd`` (sample sd, several values) of ``values`` times ``scale``."""
    scaled = [v * scale for v in values]
    if len(scaled) == 1:
        return f"{scaled[0]:.{digits}f}"
    return f"{statistics.mean(scaled):.{digits}f} ± {statistics.stdev(scaled):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--arch", choices=ARCHS, default="small-cnn")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps-per-round", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--synthetic-size", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="K = 1, 2; 2 rounds of 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.seeds, args.batch, args.steps_per_round, args.rounds = [1, 2], [0], 4, 4, 2
        args.synthetic_size, args.eval_examples = 64, 16
    if 1 not in args.ks:
        parser.error("--ks must include 1: it is the reference the others are compared with")
    torch.set_num_threads(args.threads)
    print(f"# steps_per_message: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"machine: {machine_line(args.threads)}")
    results: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    reference: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as data_root:
        base = base_config(args, data_root)
        for seed in args.seeds:
            histories = {}
            for k in sorted(args.ks):
                tic = time.perf_counter()
                config = base.replace(seed=seed, steps_per_message=k)
                history = train(config, args.clients, args.arch)
                histories[k] = history
                last = history.iloc[-1]
                print(
                    f"seed {seed} K={k}: accuracy {last['test_accuracy']:.4f}, "
                    f"loss {last['train_loss']:.4f} ({time.perf_counter() - tic:.0f} s)",
                    flush=True,
                )
            reference[seed] = float(histories[1].iloc[-1]["test_accuracy"])
            for k, history in histories.items():
                last = history.iloc[-1]
                reach = traffic_to_accuracy(history, reference[seed], traffic="total")
                results[(k, seed)] = (
                    float(last["test_accuracy"]),
                    float(last["train_loss"]),
                    reach,
                    float(history["total_bytes"].sum()),
                )
    print(f"\nmachine after: {machine_line(args.threads)}")
    steps = args.rounds * args.steps_per_round
    model = "ResNet18 shallow" if args.arch == "resnet18" else "small CNN (32x32x32 cut)"
    print(
        f"\n{model}, synthetic {args.synthetic_size} images (10 classes), "
        f"{args.clients} clients, batch {args.batch}, {steps} steps ({args.rounds} rounds), "
        f"lr {args.lr} constant, MS 0.99/2 bits up, raw gradients down, seeds {args.seeds}\n"
    )
    print(
        "| K | final test accuracy (%) | change vs K=1 (points) | final train loss | "
        "total MB sent | MB to K=1's final accuracy |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for k in sorted(args.ks):
        runs = [results[(k, s)] for s in args.seeds]
        change = [r[0] - results[(1, s)][0] for r, s in zip(runs, args.seeds, strict=True)]
        reached = [r[2] for r in runs]
        reach_text = (
            "never"
            if all(math.isinf(r) for r in reached)
            else mean_sd([r for r in reached if not math.isinf(r)], 1e-6, 1)
            + ("" if not any(math.isinf(r) for r in reached) else " (some never)")
        )
        print(
            f"| {k} | {mean_sd([r[0] for r in runs], 100)} | {mean_sd(change, 100)} | "
            f"{mean_sd([r[1] for r in runs], 1, 3)} | {mean_sd([r[3] for r in runs], 1e-6, 1)} "
            f"| {reach_text} |"
        )


if __name__ == "__main__":
    main()
