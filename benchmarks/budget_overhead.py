"""What choosing a codec within a byte budget costs, against one training step.

Run by hand (not part of the tests)::

    nice .venv/bin/python benchmarks/budget_overhead.py            # batch 64, ResNet18 shallow
    nice .venv/bin/python benchmarks/budget_overhead.py --quick    # batch 16, seconds

Setup: ResNet18 split at the shallow cut (activations 64x32x32 per example), synthetic 32x32
inputs, one client. A step is the client forward, MS 0.99/2-bit encode, decode, the server's
forward and backward, the client's backward and both SGD steps (no messaging). After
``--warmup`` such steps (so the features are not those of the random initialisation), the
script times, on the same batch:

* ``measure`` on the activations (a client's probe), ``budget-bits`` = the MS preset's cost;
* ``measure`` on the server's gradient w.r.t. the activations (the downlink grid);
* ``fit_to_budget`` on a message that fits (the check every step pays).

The overhead per step is the probe's time divided by the steps between two choices: at
``budget-every`` = 1 that is the steps of one round; the table also gives it for one step.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

import torch
from torch import nn

from flwr_splitms.codecs import decode_bytes, get_codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.core import budget as B
from flwr_splitms.models import split_model


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3, help="training steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per row (median)")
    parser.add_argument("--sample", type=int, default=SplitConfig().budget_sample, help="rows")
    parser.add_argument("--budget-bits", type=float, default=0.0, help="0 = the MS preset's")
    parser.add_argument("--grad-budget-bits", type=float, default=8.0)
    parser.add_argument("--steps-per-round", type=int, default=39, help="for the amortized row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 16, one warm-up step")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.warmup, args.repeats = 16, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    client, server = split_model("resnet18", cut="shallow", num_classes=100)
    params = [*client.parameters(), *server.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    x = torch.rand(args.batch, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch,))
    ms = get_codec("ms", ratio=0.99, bits=2)
    loss_fn = nn.CrossEntropyLoss()
    state: dict[str, torch.Tensor] = {}

    def step() -> None:
        opt.zero_grad()
        acts = client(x)
        blob = ms.encode(acts.detach()).to_bytes()
        smashed = decode_bytes(blob).requires_grad_(True)
        loss = loss_fn(server(smashed), y)
        loss.backward()
        acts.backward(smashed.grad)
        opt.step()
        state["acts"], state["grad"] = acts.detach(), smashed.grad.detach()

    for _ in range(args.warmup):
        step()
    step_s, _ = _timed(step, args.repeats)
    acts, grad = state["acts"], state["grad"]
    shape = tuple(acts.shape)
    bits = args.budget_bits or B.CodecChoice.of("ms", ratio=0.99, bits=2).wire_nbytes(
        shape
    ) * 8 / math.prod(shape)
    bits = math.ceil(bits * 1e4) / 1e4

    up_s, up = _timed(lambda: B.measure(acts, bits, sample=args.sample), args.repeats)
    down_s, down = _timed(
        lambda: B.measure(grad, args.grad_budget_bits, sample=args.sample, grid=B.DOWNLINK),
        args.repeats,
    )
    decision = B.decide([up])  # type: ignore[list-item]
    payload, error = ms.encode_measured(acts)
    guard_s, _ = _timed(
        lambda: B.fit_to_budget(payload, error, acts, bits, decision.fallback), args.repeats
    )

    print(_uptime())
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); ResNet18 shallow, batch "
        f"{args.batch} (activations {shape}), sample {args.sample} rows, "
        f"budget-bits {bits:g}, grad-budget-bits {args.grad_budget_bits:g}\n"
    )
    rows = [
        ("training step (no messaging)", step_s, ""),
        ("measure, activations (probe)", up_s, f"{len(up)} settings measured"),  # type: ignore[arg-type]
        ("measure, gradient (server)", down_s, f"{len(down)} settings measured"),  # type: ignore[arg-type]
        ("fit_to_budget, message fits", guard_s, "every step"),
    ]
    print("| what | seconds | % of a step | % per step at budget-every=1 | note |")
    print("|---|---|---|---|---|")
    for name, sec, note in rows:
        per_round = sec / args.steps_per_round if "measure" in name else sec
        share = "" if name.startswith("training") else f"{100 * sec / step_s:.1f}%"
        amort = "" if name.startswith("training") else f"{100 * per_round / step_s:.2f}%"
        print(f"| {name} | {sec:.3f} | {share} | {amort} | {note} |")
    print(f"\n(amortized over --steps-per-round {args.steps_per_round})\n")
    print("| setting | error (sample) | error (batch) | bytes (est.) | bytes | bits/el. |")
    print("|---|---|---|---|---|---|")
    for label, m in sorted(up.items(), key=lambda kv: kv[1].error):  # type: ignore[union-attr]
        payload, whole = B.CodecChoice.parse(label).build().encode_measured(acts)
        size = len(payload.to_bytes())
        print(
            f"| {label} | {m.error:.4f} | {whole:.4f} | {m.nbytes} | {size} | "
            f"{size * 8 / math.prod(shape):.4f} |"
        )
    print(f"\nchoice: {decision.choice.label}; fallback: {decision.fallback.label}")
    print(f"gradient choice at {args.grad_budget_bits:g} bits: {B.choose([down]).label}")  # type: ignore[list-item]


if __name__ == "__main__":
    main()
