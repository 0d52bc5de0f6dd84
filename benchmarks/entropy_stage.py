"""The entropy stage and the downlink codecs on real ResNet18 activations and gradients.

Run by hand (not part of the tests)::

    .venv/bin/python benchmarks/entropy_stage.py [--train-steps 20] [--reps 5] [--threads 1]

A CIFAR-style ResNet18 (10 classes) is trained briefly with SGD on the offline synthetic set,
then for one batch of 64 images at each named cut (shallow 64x32x32, medium 128x16x16, deep
256x8x8) it prints three tables:

1. **Entropy stage** (uplink): MS 0.99/2 bits without and with ``entropy="zstd"``: wire bytes,
   saving against raw float32 (``x raw``), and the extra encode/decode milliseconds of the stage
   alone (``entropy.encode_sections`` / ``decode_sections`` on the MS sections, median of
   ``--reps``). The decoded tensors are checked to be bit-identical.
2. **Method choice** (shallow cut, MS mask and values): zstd at several levels, zlib and lzma,
   with kB saved per ms of compress+decompress time, the criterion ``entropy.py`` was chosen by.
3. **Downlink**: the gradient of the server's loss w.r.t. the decoded activations, sent with each
   gradient codec: bytes down, total saving (raw float32 up+down over MS-zstd up + codec
   down), and the relative 2-norm difference of the client's parameter gradients against the
   raw gradient (the effect on the client's update). A line per cut splits the positions into
   MS support, ReLU zeros and code-0 positives, and checks that dropping the gradient at the
   ReLU zeros alone changes nothing (``mask`` reuse also drops the code-0 positives).
"""

from __future__ import annotations

import argparse
import lzma
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable

import torch
import zstandard
from torch import nn

from flwr_splitms.codecs import Payload, decode_bytes, get_codec
from flwr_splitms.codecs import entropy as E
from flwr_splitms.codecs.downlink import get_grad_codec, support_of
from flwr_splitms.data import load_dataset
from flwr_splitms.models import full_model, split_model

CUTS = ("shallow", "medium", "deep")


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def train_briefly(model: nn.Module, steps: int, batch: int, seed: int) -> None:
    """``steps`` SGD steps on synthetic images, so that activations look like a trained net's."""
    data = load_dataset("synthetic", num_classes=10, size=max(batch * max(steps, 1), 512))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x, y = data.batch(idx, augment=True, generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == steps - 1:
            print(f"  train step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)


def entropy_rows(acts: dict[str, torch.Tensor], reps: int) -> None:
    plain, coded = (
        get_codec("ms", ratio=0.99, bits=2),
        get_codec("ms", ratio=0.99, bits=2, entropy="zstd"),
    )
    head = (
        f"{'cut':<8} {'shape':<16} {'raw MB':>7} {'MS bytes':>10} {'x raw':>6} "
        f"{'MS+zstd':>10} {'x raw':>6} {'mask':>6} {'enc +ms':>8} {'dec +ms':>8}"
    )
    print(head)
    print("-" * len(head))
    for cut, a in acts.items():
        p0, p1 = plain.encode(a), coded.encode(a)
        b0, b1 = p0.to_bytes(), p1.to_bytes()
        y0, y1 = decode_bytes(b0), decode_bytes(b1)
        assert torch.equal(y0.view(torch.int32), y1.view(torch.int32)), "not bit-identical"
        enc = median_ms(lambda p0=p0: E.encode_sections(coded.params, p0.sections), reps)
        dec = median_ms(lambda p1=p1: E.decode_sections(coded.params, p1.sections), reps)
        raw = a.numel() * 4
        mask_ratio = len(p1.sections[0]) / len(p0.sections[0])
        print(
            f"{cut:<8} {'x'.join(map(str, a.shape)):<16} {raw / 1e6:>7.2f} {len(b0):>10,d} "
            f"{raw / len(b0):>6.2f} {len(b1):>10,d} {raw / len(b1):>6.2f} {mask_ratio:>6.3f} "
            f"{enc:>8.2f} {dec:>8.2f}"
        )


def method_rows(a: torch.Tensor, reps: int) -> None:
    sections = get_codec("ms", ratio=0.99, bits=2).encode(a).sections
    data = b"".join(sections)
    methods: list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = []
    for level in (-5, 1, 3, 9):
        cctx = zstandard.ZstdCompressor(level=level)
        dctx = zstandard.ZstdDecompressor()
        methods.append((f"zstd {level}", cctx.compress, dctx.decompress))
    methods += [
        ("zlib 1", lambda b: zlib.compress(b, 1), zlib.decompress),
        ("zlib 6", lambda b: zlib.compress(b, 6), zlib.decompress),
        ("lzma 0", lambda b: lzma.compress(b, preset=0), lzma.decompress),
    ]
    head = f"{'method':<8} {'bytes':>10} {'saved':>7} {'comp ms':>8} {'decomp ms':>9} {'kB/ms':>7}"
    print(head)
    print("-" * len(head))
    for name, comp, decomp in methods:
        out = sum(len(comp(s)) for s in sections)
        c_ms = median_ms(lambda comp=comp: [comp(s) for s in sections], reps)
        blobs = [comp(s) for s in sections]
        d_ms = median_ms(lambda decomp=decomp, blobs=blobs: [decomp(b) for b in blobs], reps)
        saved = len(data) - out
        print(
            f"{name:<8} {out:>10,d} {saved / len(data):>7.1%} {c_ms:>8.2f} {d_ms:>9.2f} "
            f"{saved / 1e3 / (c_ms + d_ms):>7.1f}"
        )


def client_param_grads(client: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    client.zero_grad(set_to_none=True)
    client(x).backward(grad)
    return torch.cat([p.grad.reshape(-1) for p in client.parameters() if p.grad is not None])


def downlink_rows(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> None:
    choices = [
        ("none", {}),
        ("fp16", {}),
        ("bf16", {}),
        ("mask", {}),
        ("mask", {"values": "fp16"}),
        ("ms", {"ratio": 0.9, "bits": 4}),
    ]
    codec = get_codec("ms", ratio=0.99, bits=2, entropy="zstd")
    head = (
        f"{'cut':<8} {'downlink':<18} {'up bytes':>10} {'down bytes':>11} {'x total':>8} "
        f"{'client grad rel. diff':>22}"
    )
    print(head)
    print("-" * len(head))
    for cut in CUTS:
        client, server = split_model("resnet18", cut, model=model)
        with torch.no_grad():
            a = client(x)
        payload = codec.encode(a)
        up = len(payload.to_bytes())
        a_hat = decode_bytes(payload.to_bytes()).requires_grad_(True)
        nn.functional.cross_entropy(server(a_hat), y).backward()
        grad = a_hat.grad
        assert grad is not None
        full = client_param_grads(client, x, grad)
        support = support_of(Payload.from_bytes(payload.to_bytes()))  # the server's view
        raw = 2 * 4 * a.numel()
        zero = a == 0
        exact = client_param_grads(client, x, torch.where(zero, 0.0, grad))
        rel0 = float(torch.linalg.vector_norm(exact - full) / torch.linalg.vector_norm(full))
        print(
            f"{cut:<8} positions: MS support {support.float().mean():.1%}, ReLU zeros "
            f"{zero.float().mean():.1%}, code 0 with a > 0 {(~support & ~zero).float().mean():.1%}"
            f"; dropping the gradient at the ReLU zeros only: rel. diff {rel0:.4f}"
        )
        for name, params in choices:
            gc = get_grad_codec(name, **params)
            blob = gc.encode(grad, support=support)
            back = gc.decode(blob, support=support_of(payload), shape=a.shape)  # client's view
            g = client_param_grads(client, x, back)
            rel = float(torch.linalg.vector_norm(g - full) / torch.linalg.vector_norm(full))
            label = name + "".join(f" {k}={v}" for k, v in params.items())
            print(
                f"{cut:<8} {label:<18} {up:>10,d} {len(blob):>11,d} "
                f"{raw / (up + len(blob)):>8.2f} {rel:>22.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, zstd {zstandard.ZSTD_VERSION}, {torch.get_num_threads()} "
        f"thread(s), {os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}, "
        f"median of {args.reps}"
    )

    model = full_model("resnet18", num_classes=10)
    print(f"training ResNet18 for {args.train_steps} steps on synthetic images")
    train_briefly(model, args.train_steps, args.batch, args.seed)
    data = load_dataset("synthetic", num_classes=10, size=512, train=False)
    x, y = data.batch(torch.arange(args.batch))
    acts: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # train mode: the batch statistics a client uses while training
        for cut in CUTS:
            client, _ = split_model("resnet18", cut, model=model)
            acts[cut] = client(x)

    print("\n1. Entropy stage on MS 0.99/2 bits (uplink)")
    entropy_rows(acts, args.reps)
    print("\n2. Method choice on the shallow cut's MS sections")
    method_rows(acts["shallow"], args.reps)
    print("\n3. Downlink choices (uplink: MS 0.99/2 bits + zstd)")
    downlink_rows(model, x, y)


if __name__ == "__main__":
    main()
