"""Both directions of the link: bytes and accuracy of each gradient codec at MS's uplink policy.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/downlink.py              # the recorded table (3 seeds)
    nice .venv/bin/python benchmarks/downlink.py --quick      # smoke run

The uplink is the paper's MS policy (ratio 0.99, 2 bits) in every run; only ``grad-codec``
changes. Two tables:

* bytes: ResNet18 shallow at ``--bytes-batch`` (64: 64x64x32x32 activations), one client, the
  first ``--bytes-steps`` training steps. Bytes per step come from the local engine's history
  (what ``uplink_bytes`` and ``downlink_bytes`` count), so they are the exact wire sizes. The
  raw reference is float32 activations up and float32 gradients down (the same size): "total
  saving" = 2 x raw / (up + down), "uplink saving" = raw / up;
* accuracy: the final test accuracy after the same number of steps with the same seeds (local
  engine), and its change against ``grad-codec=none`` (raw gradients, the paper) per seed. By
  default with the small CNN of ``steps_per_message.py`` (``--arch resnet18`` for the real
  model: 28x the multiply-adds per image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import pandas as pd
import torch
from step_time import machine_line
from steps_per_message import ARCHS, base_config, mean_sd, train

# (label, grad_codec, grad-codec-* parameters)
CHOICES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("none", "none", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("mask", "mask", {}),
    ("mask + fp16 values", "mask", {"values": "fp16"}),
    ("sp 0.9", "sp", {"ratio": 0.9}),
    ("sp 0.99", "sp", {"ratio": 0.99}),
    ("qu 3 bits", "qu", {"bits": 3}),
    ("ms 0.99/2", "ms", {"ratio": 0.99, "bits": 2}),
)


def _bytes(history: pd.DataFrame, clients: int) -> dict[str, float]:
    """Uplink, downlink and raw (float32 activation) bytes per client and step of a run."""
    per = float(history["steps"].sum()) * clients
    return {
        "up": float(history["uplink_bytes"].sum()) / per,
        "down": float(history["downlink_bytes"].sum()) / per,
        "raw": float(history["uplink_raw_bytes"].sum()) / per,
    }


def _savings(b: dict[str, float]) -> str:
    """Uplink, downlink and total saving against float32 both ways, as table cells."""
    total = 2 * b["raw"] / (b["up"] + b["down"])
    return f"{b['raw'] / b['up']:.2f}x | {b['raw'] / b['down']:.2f}x | {total:.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--choices", nargs="+", default=[c[0] for c in CHOICES])
    parser.add_argument(
        "--seed-choices",
        nargs="+",
        default=["none", "bf16", "mask", "mask + fp16 values", "sp 0.99", "ms 0.99/2"],
        help="choices trained with every seed; the others with the first seed only",
    )
    parser.add_argument("--arch", choices=ARCHS, default="small-cnn", help="of the accuracy runs")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps-per-round", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--synthetic-size", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bytes-batch", type=int, default=64, help="of the ResNet18 bytes runs")
    parser.add_argument("--bytes-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 rounds of 2 steps")
    args = parser.parse_args(argv)
    known = {c[0]: c for c in CHOICES}
    unknown = [c for c in [*args.choices, *args.seed_choices] if c not in known]
    if unknown:
        parser.error(f"unknown choice(s) {unknown}; choose from {list(known)}")
    if "none" not in args.choices:
        parser.error("--choices must include none: it is the reference")
    if args.quick:
        args.seeds, args.batch, args.steps_per_round, args.rounds = [0], 4, 2, 2
        args.synthetic_size, args.eval_examples, args.bytes_batch, args.bytes_steps = 64, 16, 4, 1
    torch.set_num_threads(args.threads)
    print(f"# downlink: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"machine: {machine_line(args.threads)}")
    wire: dict[str, dict[str, float]] = {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as data_root:
        base = base_config(args, data_root).replace(codec_ratio=0.99, codec_bits=2)
        resnet = base.replace(
            batch_size=args.bytes_batch,
            steps_per_round=args.bytes_steps,
            num_server_rounds=1,
            synthetic_size=max(args.bytes_batch * args.bytes_steps, args.synthetic_size),
        )
        for label in args.choices:
            _, grad_codec, params = known[label]
            changes = {f"grad_codec_{k}": v for k, v in params.items()}
            tic = time.perf_counter()
            config = resnet.replace(grad_codec=grad_codec, seed=args.seeds[0], **changes)
            wire[label] = _bytes(train(config, 1, "resnet18", evaluate=False), 1)
            print(
                f"{label} ResNet18 bytes: up {wire[label]['up']:.0f} B, down "
                f"{wire[label]['down']:.0f} B per step ({time.perf_counter() - tic:.0f} s)",
                flush=True,
            )
        for label in args.choices:
            _, grad_codec, params = known[label]
            changes = {f"grad_codec_{k}": v for k, v in params.items()}
            accuracy: list[float] = []
            seeds = args.seeds if label in args.seed_choices or label == "none" else args.seeds[:1]
            for seed in seeds:
                tic = time.perf_counter()
                config = base.replace(grad_codec=grad_codec, seed=seed, **changes)
                history = train(config, args.clients, args.arch)
                accuracy.append(float(history.iloc[-1]["test_accuracy"]))
                print(
                    f"{label} seed {seed}: accuracy {accuracy[-1]:.4f} "
                    f"({time.perf_counter() - tic:.0f} s)",
                    flush=True,
                )
            rows[label] = {"accuracy": accuracy, **_bytes(history, args.clients)}
    print(f"\nmachine after: {machine_line(args.threads)}")
    print(
        f"\nBytes: ResNet18 shallow, batch {args.bytes_batch} ({args.bytes_batch}x64x32x32 "
        f"float32 activations), uplink MS 0.99/2 bits, per client and step, averaged over the "
        f"first {args.bytes_steps} training steps (seed {args.seeds[0]}); savings against "
        "float32 in both directions\n"
    )
    print(
        "| downlink | uplink B/step | downlink B/step | uplink saving | downlink saving | "
        "total saving |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, b in wire.items():
        print(f"| {label} | {b['up']:,.0f} | {b['down']:,.0f} | {_savings(b)} |")
    reference = rows["none"]["accuracy"]
    steps = args.rounds * args.steps_per_round
    model = "ResNet18 shallow" if args.arch == "resnet18" else "small CNN (32x32x32 cut)"
    print(
        f"\nAccuracy: {model}, synthetic {args.synthetic_size} images (10 classes), "
        f"{args.clients} clients, batch {args.batch}, {steps} steps, lr {args.lr} constant, "
        f"uplink MS 0.99/2 bits, test accuracy on {args.eval_examples} held-out images after the "
        f"last step; seeds {args.seeds}"
        + (
            ""
            if set(args.seed_choices) >= set(args.choices)
            else f" for {', '.join(args.seed_choices)}, seed {args.seeds[0]} for the others"
        )
        + "; the savings are this model's\n"
    )
    print(
        "| downlink | total saving | final test accuracy (%) | change vs none (points) | "
        "per seed (%) |"
    )
    print("|---|---:|---:|---:|---|")
    for label, r in rows.items():
        change = [a - b for a, b in zip(r["accuracy"], reference, strict=False)]
        total = 2 * r["raw"] / (r["up"] + r["down"])
        per_seed = ", ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        print(
            f"| {label} | {total:.2f}x | {mean_sd(r['accuracy'], 100)} | "
            f"{mean_sd(change, 100)} | {per_seed} |"
        )


if __name__ == "__main__":
    main()
