"""Bit-identity with the original numpy implementation of every codec.

``GOLDEN`` holds SHA-256 digests (first 16 hex digits) of the data sections, flags and
decoded tensors that the numpy implementation (before the codecs moved to torch) produced for
a grid of inputs: ranks 0..5, odd sizes and sizes not a multiple of 8, float32/float16/
bfloat16, signed and non-negative inputs, every codec and setting (MS/QU bits 1..8, QU 11 and
16, both MS scopes, roundings and sign modes). The torch implementation must reproduce every
byte on every device. Magnitudes are distinct, so the top-k sets have no ties (the old
implementation left tie breaking unspecified; the torch one keeps the lowest positions,
tested in test_codecs_device and test_codecs_bitpack).

Regenerate (only for a deliberate wire-format change): ``python tests/test_codecs_golden.py``.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from flwr_splitms.codecs import Payload, get_codec

SHAPES: tuple[tuple[int, ...], ...] = (
    (),
    (1,),
    (7,),
    (13,),
    (3, 5),
    (2, 3, 7),
    (4, 1, 3, 5),
    (2, 3, 1, 2, 5),
    (9, 37),
)
BIG_SHAPE = (1, 262_147)  # long single row: the selection's narrowing fast path
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def settings() -> list[tuple[str, dict[str, object]]]:
    out: list[tuple[str, dict[str, object]]] = [("none", {})]
    out += [("qu", {"bits": b}) for b in (*range(1, 9), 11, 16)]
    out += [("sp", {"ratio": r}) for r in (0.3, 0.75, 0.99)]
    out += [("rt", {"ratio": r, "alpha": a}) for r in (0.5, 0.9) for a in (0.0, 0.3)]
    for bits in range(1, 9):
        for rounding in ("nearest", "floor"):
            for scope in ("tensor", "sample"):
                for signed in ("auto", True, False):
                    params = {"ratio": 0.7, "bits": bits, "rounding": rounding}
                    out.append(("ms", {**params, "scope": scope, "signed": signed}))
    return out


def key(name: str, params: dict[str, object]) -> str:
    return name + "".join(f",{k}={v}" for k, v in sorted(params.items()))


_DISTINCT_RANGE = {torch.float16: (0x2000, 0x5C00), torch.bfloat16: (0x3C00, 0x4380)}


def distinct(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random values with distinct magnitudes (no top-k ties), signs random."""
    n = math.prod(shape)
    if dtype == torch.float32:
        return torch.randn(shape, generator=g)
    start, stop = _DISTINCT_RANGE[dtype]
    bits = start + torch.randperm(stop - start, generator=g)[:n]
    mag = bits.to(torch.int16).view(dtype).reshape(shape)
    sign = torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1
    return mag * sign


def inputs(name: str, params: dict[str, object]) -> list[torch.Tensor]:
    """The grid for one setting: every shape and dtype, signed and non-negative values."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for shape in SHAPES:
        for dtype in DTYPES:
            x = distinct(shape, dtype, g)
            if params.get("signed") is not False:
                out.append(x)
            out.append(x.abs())
    if name in ("sp", "rt") or (name == "ms" and params["bits"] in (2, 7)):
        out.append(torch.rand(BIG_SHAPE, generator=g))
    return out


def digest(name: str, params: dict[str, object], device: str = "cpu") -> str:
    """Hash of every payload and decoded tensor of the setting's grid."""
    codec = get_codec(name, **params)
    g = torch.Generator().manual_seed(99)
    h = hashlib.sha256()
    for x in inputs(name, params):
        payload = Payload.from_bytes(codec.encode(x.to(device), generator=g).to_bytes())
        y = codec.decode(payload).to("cpu")
        assert y.dtype == x.dtype and y.shape == x.shape
        h.update(bytes([payload.flags]) + b"".join(payload.sections))
        h.update(y.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


GOLDEN: dict[str, str] = {
    "none": "4118c30f447504c4",
    "qu,bits=1": "0aeb293cac05b660",
    "qu,bits=2": "0dfa9357773a2589",
    "qu,bits=3": "680baddcae2ba496",
    "qu,bits=4": "bfdac55c68d2c913",
    "qu,bits=5": "6995e9aeebc9347c",
    "qu,bits=6": "5f14f3fdd47f83f0",
    "qu,bits=7": "0d96ec0f5453a7be",
    "qu,bits=8": "91b0acccf40c97b6",
    "qu,bits=11": "e894210153bbf199",
    "qu,bits=16": "ecb31d1a1826d610",
    "sp,ratio=0.3": "5b7b892942950d17",
    "sp,ratio=0.75": "aed0a48dcc3c1500",
    "sp,ratio=0.99": "0f1aa13d4fdf4d47",
    "rt,alpha=0.0,ratio=0.5": "27db0c121ce7c705",
    "rt,alpha=0.3,ratio=0.5": "a071dad584a0cb6c",
    "rt,alpha=0.0,ratio=0.9": "595d139292fb005e",
    "rt,alpha=0.3,ratio=0.9": "bf22bd58205d9c83",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "6349b51e2da41a62",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "8ccf6ffdc3970c1b",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "8c51b9c019cc1fee",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "e32e7fbc4a32e1a8",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=sample,signed=True": "43b4b30acec5de71",
    "ms,bits=1,ratio=0.7,rounding=nearest,scope=sample,signed=False": "0247f9b56a4fa1cf",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "6349b51e2da41a62",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=tensor,signed=True": "8ccf6ffdc3970c1b",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=tensor,signed=False": "8c51b9c019cc1fee",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=sample,signed=auto": "e32e7fbc4a32e1a8",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=sample,signed=True": "43b4b30acec5de71",
    "ms,bits=1,ratio=0.7,rounding=floor,scope=sample,signed=False": "0247f9b56a4fa1cf",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "ec21afb37a38b315",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "294876ac21d84425",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "cdceba9da9429c78",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "b5ca94a9beef6cd8",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=sample,signed=True": "6859701e39ba97af",
    "ms,bits=2,ratio=0.7,rounding=nearest,scope=sample,signed=False": "8a7c9d13ece013d3",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "77b701d9ffdd67d3",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=tensor,signed=True": "e620efead7248149",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=tensor,signed=False": "b7fbe4a9a889f980",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=sample,signed=auto": "b98d03ba312d0643",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=sample,signed=True": "e9d53253329033c2",
    "ms,bits=2,ratio=0.7,rounding=floor,scope=sample,signed=False": "d9e9fb747cf8d4ac",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "fb071f6478460c8f",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "3899282f6da58907",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "8f8bbf96d2026790",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "c953c16320c7d95e",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=sample,signed=True": "c0eb8b6f6694b7cc",
    "ms,bits=3,ratio=0.7,rounding=nearest,scope=sample,signed=False": "7f4f745b768eaeee",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "846b912dccc9b09a",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=tensor,signed=True": "6b15483eee460084",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=tensor,signed=False": "2db98a83d622e4fb",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=sample,signed=auto": "f19daa4dc710f770",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=sample,signed=True": "d3d05fbac45fefa9",
    "ms,bits=3,ratio=0.7,rounding=floor,scope=sample,signed=False": "8350f63a7c7debbb",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "34f9f79b45423d89",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "4a4e3884bfe0eeeb",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "9d228bd94879ac27",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "0433a95e4b391b57",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=sample,signed=True": "e7e6770e161f4c7e",
    "ms,bits=4,ratio=0.7,rounding=nearest,scope=sample,signed=False": "6372225d17a1e6ea",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "21391506bd70b92d",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=tensor,signed=True": "023fb5849f9343d3",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=tensor,signed=False": "eb7c2cdfd1c19747",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=sample,signed=auto": "84f4a1c56e19be89",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=sample,signed=True": "fbf6de52d09ca6fe",
    "ms,bits=4,ratio=0.7,rounding=floor,scope=sample,signed=False": "d631fa9fdb6aea31",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "cab4fe5fcbc6e9e8",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "3c8b11e3a42407be",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "36af62ca36e47597",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "e250e8f0ae79100c",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=sample,signed=True": "40ea8e03e48de083",
    "ms,bits=5,ratio=0.7,rounding=nearest,scope=sample,signed=False": "f099e90bea4ddbc9",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "1cd5c1ab6ef9ef9a",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=tensor,signed=True": "0b332483473e32d0",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=tensor,signed=False": "2d4c04d1620c6be1",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=sample,signed=auto": "b8770344a28ec35c",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=sample,signed=True": "e4f28f7a10dbcb6b",
    "ms,bits=5,ratio=0.7,rounding=floor,scope=sample,signed=False": "0127a73e28e4a573",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "655b845a92d24d96",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "d9e16c9a6d09e37d",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "2610844e98c20af8",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "8ccd95fbc11b0633",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=sample,signed=True": "f65ed6100e60aef3",
    "ms,bits=6,ratio=0.7,rounding=nearest,scope=sample,signed=False": "699881d32fbfed13",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "d3228265033fb541",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=tensor,signed=True": "1e8d066d62604780",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=tensor,signed=False": "a726319f39e3a647",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=sample,signed=auto": "281e100b9a17dd80",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=sample,signed=True": "52a6a05124a4d862",
    "ms,bits=6,ratio=0.7,rounding=floor,scope=sample,signed=False": "f0e3cd742e6a35df",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "a34a998035952e8a",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "eb45083b401c53e8",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "3e8dcd3f38161844",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "f51d8dec8e233c90",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=sample,signed=True": "ff9b2ef9cd91ce3f",
    "ms,bits=7,ratio=0.7,rounding=nearest,scope=sample,signed=False": "c3371b24fd233c49",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "c47deaaf0349c1ba",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=tensor,signed=True": "5e5ddf596793fe75",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=tensor,signed=False": "872b7ce2d8e0ffe2",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=sample,signed=auto": "19e4e2e6d3cea204",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=sample,signed=True": "92127c417c60b5fc",
    "ms,bits=7,ratio=0.7,rounding=floor,scope=sample,signed=False": "c27ec2946ff92189",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=tensor,signed=auto": "b5338c37a0c581ab",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=tensor,signed=True": "42cff419bf47974c",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=tensor,signed=False": "f055dbfc52a99e45",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=sample,signed=auto": "fb52e21d85ff7009",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=sample,signed=True": "f5836170940e16df",
    "ms,bits=8,ratio=0.7,rounding=nearest,scope=sample,signed=False": "e984f71ff4c8006b",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=tensor,signed=auto": "cb7ecaed1d050f5b",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=tensor,signed=True": "a8c80f5df2627c36",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=tensor,signed=False": "ea3237694f2aa3fe",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=sample,signed=auto": "6a1ad533aeb2644e",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=sample,signed=True": "aeb5ab4cbb1856a0",
    "ms,bits=8,ratio=0.7,rounding=floor,scope=sample,signed=False": "25c79537c0fc3d94",
}


@pytest.mark.parametrize(("name", "params"), settings(), ids=lambda v: str(v))
def test_bit_identical_to_numpy_implementation(name: str, params: dict[str, object]) -> None:
    assert digest(name, params) == GOLDEN[key(name, params)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, params in settings():
        print(f"    {key(name, params)!r}: {digest(name, params)!r},")
