"""Does the default learning-rate rule learn at every batch size? A table for docs/measurements.md.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/lr_rule.py                 # the recorded table
    nice .venv/bin/python benchmarks/lr_rule.py --batches 16 --clients 2 --rule paper

Each run is the local engine on the offline synthetic set (10 classes), MS 0.99/2 bits,
``--rounds`` x ``--steps`` steps, the run-config defaults otherwise; ``--arch resnet18`` (cut
shallow, the default) or ``small-cnn`` (``steps_per_message.small_cnn``: the same kind of 32x32
ReLU cut activations at 1/28 of ResNet18's multiply-adds, for the whole grid on a shared CPU).
``--rule`` picks the learning-rate rule: ``default`` (``lr`` 0.1 at batch 64, scaled with the
square root of the batch size, ``warmup-steps`` ramp, the output layer at ``head-lr-scale`` 0.1
of the rate, BatchNorm statistics re-estimated at each round's end) or ``paper``
(``lr-scaling="none"``, ``warmup-steps=0``, ``head-lr-scale=1``, ``reestimate-bn=false``: lr
0.1 whatever the batch, every layer, PyTorch's running statistics). Columns: the loss at
initialisation (the mean training loss of round 1's batches at a rate of 1e-12, so over the
same batches as round 1 but untrained: one batch's loss would be too noisy a reference), each
round's mean training loss and test accuracy, and whether every round's loss stayed below the
initial loss and the accuracy rose.

Other settings to compare against the rule (issue #18's batch-8 target)::

    nice .venv/bin/python benchmarks/lr_rule.py --batches 8 --clients 2 --seeds 0 1 2 \
        --codecs none ms --synthetic-size 5000 --eval-max-examples 0 \
        --set lr-scaling=none --set lr=0.05 --zero-init-residual

``--set KEY=VALUE`` changes a run-config key (hyphenated) in every run; ``--zero-init-residual``
starts each residual block's last BatchNorm at zero (Goyal et al.'s other trick; torchvision's
``zero_init_residual``). ``--synthetic-size 5000 --eval-max-examples 0`` are the run-config
defaults (5,000 training images, the whole 1,000-image test set), the set-up of the issue's target.
"""

from __future__ import annotations

import argparse
import sys
import time
import tomllib

import torch
from step_time import machine_line
from steps_per_message import small_cnn

from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import evaluation_data, num_classes
from flwr_splitms.local import run_local
from flwr_splitms.models import split_model

RULES = {
    "default": {},
    "paper": {
        "lr_scaling": "none",
        "warmup_steps": 0,
        "head_lr_scale": 1.0,
        "reestimate_bn": False,
    },
}


def run(
    batch: int,
    clients: int,
    rule: str,
    rounds: int,
    steps: int,
    seed: int,
    arch: str,
    *,
    codec: str = "ms",
    synthetic_size: int = 0,
    eval_max_examples: int = 256,
    settings: dict[str, object] | None = None,
    zero_init_residual: bool = False,
) -> dict:
    """One local run; its loss at initialisation, per-round losses and accuracies.

    ``synthetic_size`` 0 = just enough images for the run (at least 640).
    """
    base = SplitConfig(
        dataset="synthetic",
        data_download=False,
        num_classes=10,
        synthetic_size=synthetic_size or max(clients * batch * steps, 640),
        num_server_rounds=rounds,
        steps_per_round=steps,
        batch_size=batch,
        eval_max_examples=eval_max_examples,
        seed=seed,
        codec=codec,
        **RULES[rule],
    )
    # --set goes through the run-config parser: the same keys, values and checks as a user's
    config = SplitConfig.from_run_config({**base.to_run_config(), **(settings or {})})

    def train(config: SplitConfig, evaluate: bool = True):  # type: ignore[no-untyped-def]
        if arch == "resnet18" and not zero_init_residual:
            return run_local(config, clients, evaluate=evaluate).history
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if arch == "resnet18":
                models = split_model(
                    "resnet18", config.cut, num_classes(config), zero_init_residual=True
                )
            else:
                models = small_cnn(10, config.seed)
        test = evaluation_data(config) if evaluate else None
        # run_local builds the clients' data from config; with models= it needs the test set
        return run_local(config, clients, evaluate=evaluate, models=models, test_data=test).history

    # the loss at initialisation: round 1 at a rate of ~0, i.e. on the same batches, untrained
    probe = config.replace(num_server_rounds=1, lr=1e-12)
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


def setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line; VALUE read as a TOML value (a bare word: a string)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE, e.g. lr=0.05")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 10])
    parser.add_argument("--rule", choices=sorted(RULES), nargs="+", default=["default"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--codecs", nargs="+", default=["ms"])
    parser.add_argument("--arch", choices=["resnet18", "small-cnn"], default="resnet18")
    parser.add_argument("--synthetic-size", type=int, default=0, help="0: enough for the run")
    parser.add_argument("--eval-max-examples", type=int, default=256, help="0: all test images")
    parser.add_argument("--set", type=setting, action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--zero-init-residual", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(args.set)
    label = " ".join(f"{k}={v}" for k, v in settings.items())
    if args.zero_init_residual:
        label = f"{label} zero-init-residual".strip()
    print(machine_line(torch.get_num_threads()))
    print(
        "| model | rule | batch | clients | codec | seed | lr | initial loss | round losses "
        "| test accuracy | learns | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rule in args.rule:
        for batch in args.batches:
            for clients in args.clients:
                for codec in args.codecs:
                    for seed in args.seeds:
                        r = run(
                            batch,
                            clients,
                            rule,
                            args.rounds,
                            args.steps,
                            seed,
                            args.arch,
                            codec=codec,
                            synthetic_size=args.synthetic_size,
                            eval_max_examples=args.eval_max_examples,
                            settings=settings,
                            zero_init_residual=args.zero_init_residual,
                        )
                        learns = all(loss < r["initial loss"] for loss in r["losses"]) and (
                            r["accuracies"][-1] > r["accuracies"][0] or r["accuracies"][-1] > 0.2
                        )
                        name = f"{rule} ({label})" if label else rule
                        print(
                            f"| {args.arch} | {name} | {batch} | {clients} | {codec} | {seed} | "
                            + f"{r['lr']:.4g} | {r['initial loss']:.2f} | "
                            + " / ".join(f"{x:.2f}" for x in r["losses"])
                            + " | "
                            + " / ".join(f"{100 * a:.0f} %" for a in r["accuracies"])
                            + f" | {'yes' if learns else 'NO'} | {r['seconds']:.0f} |",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
