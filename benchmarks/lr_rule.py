"""Does the default learning-rate rule learn at every batch size? A table for docs/measurements.md.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/lr_rule.py                 # the recorded table
    nice .venv/bin/python benchmarks/lr_rule.py --batches 16 --clients 2 --rule paper

Each run is the local engine on the offline synthetic set (10 classes), MS 0.99/2 bits,
``--rounds`` x ``--steps`` steps, the run-config defaults otherwise; ``--arch resnet18`` (cut
shallow, the default) or ``small-cnn`` (``steps_per_message.small_cnn``: the same kind of 32x32
ReLU cut activations at 1/28 of ResNet18's multiply-adds, for the whole grid on a shared CPU).
``--rule`` picks the learning-rate rule: ``default`` (``lr`` 0.1 at batch 64, scaled linearly
with the batch size, ``warmup-steps`` ramp) or ``paper`` (``lr-scaling="none"``,
``warmup-steps=0``: lr 0.1 whatever the batch). Columns: the training loss of the first step
(the loss at initialisation), each round's mean training loss and test accuracy, and whether
every round's loss stayed below the initial loss and the accuracy rose.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from step_time import machine_line
from steps_per_message import small_cnn

from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import client_data, evaluation_data
from flwr_splitms.local import run_local

RULES = {"default": {}, "paper": {"lr_scaling": "none", "warmup_steps": 0}}


def run(batch: int, clients: int, rule: str, rounds: int, steps: int, seed: int, arch: str) -> dict:
    """One local run; its first-step loss, per-round losses and accuracies."""
    config = SplitConfig(
        dataset="synthetic",
        data_download=False,
        num_classes=10,
        synthetic_size=max(clients * batch * steps, 640),
        num_server_rounds=rounds,
        steps_per_round=steps,
        batch_size=batch,
        eval_max_examples=256,
        seed=seed,
        **RULES[rule],
    )

    # the first step's loss is taken before any update: a one-step run gives it
    def train(config: SplitConfig, evaluate: bool = True):  # type: ignore[no-untyped-def]
        if arch == "resnet18":
            return run_local(config, clients, evaluate=evaluate).history
        data = [client_data(config, c, clients)[0] for c in range(clients)]
        models = small_cnn(10, config.seed)
        test = evaluation_data(config) if evaluate else None
        return run_local(
            config, clients, evaluate=evaluate, models=models, client_data=data, test_data=test
        ).history

    probe = config.replace(num_server_rounds=1, steps_per_round=1)
    initial = float(train(probe, evaluate=False)["train_loss"].iloc[0])
    tic = time.perf_counter()
    history = train(config)
    return {
        "batch": batch,
        "clients": clients,
        "rule": rule,
        "arch": arch,
        "lr": history["lr"].iloc[0],
        "initial loss": initial,
        "losses": list(history["train_loss"]),
        "accuracies": list(history["test_accuracy"]),
        "seconds": time.perf_counter() - tic,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 10])
    parser.add_argument("--rule", choices=sorted(RULES), nargs="+", default=["default"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=["resnet18", "small-cnn"], default="resnet18")
    args = parser.parse_args(argv)
    print(machine_line(torch.get_num_threads()))
    print(
        "| model | rule | batch | clients | lr | initial loss | round losses | test accuracy "
        "| learns | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rule in args.rule:
        for batch in args.batches:
            for clients in args.clients:
                r = run(batch, clients, rule, args.rounds, args.steps, args.seed, args.arch)
                learns = all(loss < r["initial loss"] for loss in r["losses"]) and (
                    r["accuracies"][-1] > r["accuracies"][0] or r["accuracies"][-1] > 0.2
                )
                print(
                    f"| {args.arch} | {rule} | {batch} | {clients} | {r['lr']:.4g} | "
                    + f"{r['initial loss']:.2f} | "
                    + " / ".join(f"{x:.2f}" for x in r["losses"])
                    + " | "
                    + " / ".join(f"{100 * a:.0f} %" for a in r["accuracies"])
                    + f" | {'yes' if learns else 'NO'} | {r['seconds']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
