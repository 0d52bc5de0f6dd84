"""Does the default learning-rate rule learn at every batch size? A table for docs/measurements.md.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/lr_rule.py                 # the recorded table
    nice .venv/bin/python benchmarks/lr_rule.py --batches 16 --clients 2 --rule paper

Each run is the local engine on the offline synthetic set (10 classes), ResNet18 cut shallow,
MS 0.99/2 bits, ``--rounds`` x ``--steps`` steps, the run-config defaults otherwise. ``--rule``
picks the learning-rate rule: ``default`` (``lr`` 0.1 at batch 64, scaled linearly with the
batch size, ``warmup-steps`` ramp) or ``paper`` (``lr-scaling="none"``, ``warmup-steps=0``: lr
0.1 whatever the batch). Columns: the training loss of the first step (the loss at
initialisation), each round's mean training loss and test accuracy, and whether every round's
loss stayed below the initial loss and the accuracy rose.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from step_time import machine_line

from flwr_splitms.config import SplitConfig
from flwr_splitms.local import run_local

RULES = {"default": {}, "paper": {"lr_scaling": "none", "warmup_steps": 0}}


def run(batch: int, clients: int, rule: str, rounds: int, steps: int, seed: int) -> dict:
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
    probe = config.replace(num_server_rounds=1, steps_per_round=1)
    initial = float(run_local(probe, clients, evaluate=False).history["train_loss"].iloc[0])
    tic = time.perf_counter()
    history = run_local(config, clients).history
    return {
        "batch": batch,
        "clients": clients,
        "rule": rule,
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
    args = parser.parse_args(argv)
    print(machine_line(torch.get_num_threads()))
    print(
        "| rule | batch | clients | lr | initial loss | round losses | test accuracy | learns | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in args.rule:
        for batch in args.batches:
            for clients in args.clients:
                r = run(batch, clients, rule, args.rounds, args.steps, args.seed)
                learns = all(loss < r["initial loss"] for loss in r["losses"]) and (
                    r["accuracies"][-1] > r["accuracies"][0] or r["accuracies"][-1] > 0.2
                )
                print(
                    f"| {rule} | {batch} | {clients} | {r['lr']:.4g} | {r['initial loss']:.2f} | "
                    + " / ".join(f"{x:.2f}" for x in r["losses"])
                    + " | "
                    + " / ".join(f"{100 * a:.0f} %" for a in r["accuracies"])
                    + f" | {'yes' if learns else 'NO'} | {r['seconds']:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
