"""Encode/decode speed of every codec on a ResNet18-shallow activation batch (64x64x32x32, ReLU).

Run by hand (not part of the tests)::

    .venv/bin/python benchmarks/codec_speed.py [--reps 15] [--threads 1 2] [--device cpu]

For each thread count, rows: every codec with its default parameters (encode, ``to_bytes``,
``Payload.from_bytes`` and decode timed separately; "total" is their sum, i.e. the full wire
round trip), ``encode_measured`` (encode plus the compression error), then baselines:

* ``ms-reference``: MS written the way the authors' code works (``torch.topk`` over the
  flattened tensor, the b-bit codes kept in a float32 tensor, no packing, no wire format);
* ``clone``: ``tensor.clone()``, the memory-bandwidth floor for touching the batch, measured
  warm (after warm-up runs, so the allocator reuses pages instead of faulting fresh ones in).

Each time is the median over ``--reps`` runs after two warm-up runs; "min" columns give the
fastest run. "x clone" is total / clone. On a shared, loaded machine wall times measure the
queue for a core as much as the code: ``--clock cpu --threads 1`` times the CPU work alone.

Why a clone can read 8 ms instead of 0.9 ms: with 2 intra-op threads on a machine whose cores
are busy, every parallel kernel waits for its second thread to be scheduled (a scheduler time
slice, several ms), whatever the kernel's size; one thread, or an idle machine, avoids it.
Fresh (cold) 16 MiB allocations also pay ~4k first-touch page faults. The benchmark prints the
load average and the minor page faults per clone so the figures can be judged.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch

from flwr_splitms.codecs import Codec, Payload, codec_names, compression_error, get_codec

BASE_CODECS = ("none", "qu", "sp", "rt", "ms")


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": time.process_time,  # CPU time of all threads: immune to waiting for a busy core
}
clock = CLOCKS["wall"]


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median, min) time in ms over ``reps`` runs after two warm-up runs."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def reference_ms_encode(
    x: torch.Tensor, ratio: float = 0.99, bits: int = 2
) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    """Authors'-code style MS encoder: dense float32 codes, values in original order."""
    flat = x.reshape(-1)
    k = int((1 - ratio) * flat.numel())
    top = (1 << bits) - 1
    values, indices = torch.topk(flat, k)
    mask = torch.round(flat * (top / values[-1]))
    mask = torch.clamp(mask, 0, top - 1)
    mask[indices] = top
    vector = values.index_select(0, torch.sort(indices).indices)
    return x.shape, vector, mask


def reference_ms_decode(
    shape: torch.Size, vector: torch.Tensor, mask: torch.Tensor, bits: int = 2
) -> torch.Tensor:
    top = (1 << bits) - 1
    kept = mask == top
    out = mask * (vector.min() / top)
    out[kept] = vector
    return out.reshape(shape)


Row = tuple[str, list[tuple[float, float]], int, float]


def codec_row(codec: Codec, x: torch.Tensor, g: torch.Generator, reps: int) -> Row:
    dev = x.device
    payload = codec.encode(x, generator=g)
    blob = payload.to_bytes()
    parsed = Payload.from_bytes(blob)
    times = [
        timed(lambda: codec.encode(x, generator=g), reps),
        timed(payload.to_bytes, reps),
        timed(lambda: Payload.from_bytes(blob), reps),
        timed(lambda: codec.decode(parsed, device=dev), reps),
    ]
    err = compression_error(x, codec.decode(parsed, device=dev))
    return codec.name, times, len(blob), err


def baseline_rows(x: torch.Tensor, g: torch.Generator, reps: int) -> list[Row]:
    """``ms`` with ``encode_measured``, and the authors'-code-style reference."""
    codec = get_codec("ms")
    none = (0.0, 0.0)
    measured = [timed(lambda: codec.encode_measured(x, generator=g), reps), none, none, none]
    shape, vector, mask = reference_ms_encode(x)
    ref = [
        timed(lambda: reference_ms_encode(x), reps),
        none,
        none,
        timed(lambda: reference_ms_decode(shape, vector, mask), reps),
    ]
    ref_err = compression_error(x, reference_ms_decode(shape, vector, mask))
    return [
        ("ms measured", measured, 0, codec.encode_measured(x)[1]),
        ("ms-reference", ref, 4 * (mask.numel() + vector.numel()), ref_err),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 32, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codecs", nargs="+", default=list(BASE_CODECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or CPU time (on a loaded shared machine, with --threads 1)",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    unknown = set(args.codecs) - set(codec_names())
    if unknown:
        parser.error(f"unknown codecs {sorted(unknown)}; choose from {codec_names()}")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.relu(torch.randn(args.shape, generator=g)).to(args.device)
    raw = x.numel() * 4
    print(
        f"shape {tuple(x.shape)} float32 ReLU ({raw / 2**20:.0f} MiB) on {x.device}, torch "
        f"{torch.__version__}, {os.cpu_count()} CPU(s), "
        f"{platform.processor() or platform.machine()}, {args.clock} time, "
        f"median (min) of {args.reps}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'codec':<13} {'encode':>13} {'to_bytes':>10} {'from_bytes':>10} {'decode':>13} "
        f"{'total ms':>15} {'x clone':>12} {'wire bytes':>11} {'rel. error':>10}"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        clone_med, clone_min = timed(x.clone, args.reps)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (args.reps + 2)
        print(
            f"\n{threads} thread(s); warm clone {clone_med:.2f} ms (min {clone_min:.2f}), "
            f"{faults:.0f} minor page faults per clone"
        )
        print(header)
        print("-" * len(header))
        rows = [codec_row(get_codec(name), x, g, args.reps) for name in args.codecs]
        rows += baseline_rows(x, g, args.reps)
        for name, times, nbytes, err in rows:
            total_med = sum(t[0] for t in times)
            total_min = sum(t[1] for t in times)
            cells = " ".join(
                f"{t[0]:>6.1f} ({t[1]:>4.1f})" if i in (0, 3) else f"{t[0]:>10.2f}"
                for i, t in enumerate(times)
            )
            print(
                f"{name:<13} {cells} {total_med:>6.1f} ({total_min:>5.1f}) "
                f"{total_med / clone_med:>5.1f} ({total_min / clone_min:>4.1f}) "
                f"{nbytes:>11,d} {err:>10.4f}"
            )


if __name__ == "__main__":
    main()
