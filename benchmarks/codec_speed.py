"""Encode/decode speed of every codec on a ResNet18-shallow activation batch (64x64x32x32, ReLU).

Run by hand (not part of the tests)::

    .venv/bin/python benchmarks/codec_speed.py [--reps 7] [--threads N] [--shape 64 64 32 32]

Rows: every codec with its default parameters (encode = ``encode`` + ``to_bytes``, decode =
``decode_bytes``, i.e. including the wire format), then two baselines:

* ``ms-reference``: MS written the way the authors' code works (``torch.topk`` over the
  flattened tensor, the b-bit codes kept in a float32 tensor, no packing, no wire format);
  its "bytes" are what sending those two float32 tensors would cost;
* ``clone``: one ``tensor.clone()``, the memory-bandwidth floor for touching the batch.

Times are medians over ``--reps`` repetitions after one warm-up; "x ref" is
(encode + decode) / (encode + decode of ms-reference).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from flwr_splitms.codecs import Codec, codec_names, compression_error, decode_bytes, get_codec


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 32, 32])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(args.seed)
    x = torch.relu(torch.randn(args.shape, generator=g))
    raw = x.numel() * 4
    print(
        f"shape {tuple(x.shape)} float32 ReLU ({raw / 2**20:.0f} MiB), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s), "
        f"{platform.processor() or platform.machine()}, median of {args.reps}"
    )

    rows: list[tuple[str, float, float, int, float]] = []
    for name in codec_names():
        codec = get_codec(name)
        blob = codec.encode(x, generator=g).to_bytes()

        def encode(codec: Codec = codec) -> bytes:
            return codec.encode(x, generator=g).to_bytes()

        def decode(blob: bytes = blob) -> torch.Tensor:
            return decode_bytes(blob)

        enc = median_ms(encode, args.reps)
        dec = median_ms(decode, args.reps)
        err = compression_error(x, decode_bytes(blob))
        rows.append((name, enc, dec, len(blob), err))

    shape, vector, mask = reference_ms_encode(x)
    ref_enc = median_ms(lambda: reference_ms_encode(x), args.reps)
    ref_dec = median_ms(lambda: reference_ms_decode(shape, vector, mask), args.reps)
    ref_err = compression_error(x, reference_ms_decode(shape, vector, mask))
    rows.append(("ms-reference", ref_enc, ref_dec, 4 * (mask.numel() + vector.numel()), ref_err))
    rows.append(("clone", median_ms(lambda: x.clone(), args.reps), 0.0, raw, 0.0))

    ref_total = ref_enc + ref_dec
    header = (
        f"{'codec':<13} {'encode ms':>10} {'decode ms':>10} {'wire bytes':>11} "
        f"{'x smaller':>10} {'rel. error':>10} {'x ref':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, enc, dec, nbytes, err in rows:
        print(
            f"{name:<13} {enc:>10.1f} {dec:>10.1f} {nbytes:>11,d} {raw / nbytes:>10.2f} "
            f"{err:>10.4f} {(enc + dec) / ref_total:>7.2f}"
        )


if __name__ == "__main__":
    main()
