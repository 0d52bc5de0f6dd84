"""The self-describing wire format: layout, header overhead, and rejection of malformed bytes."""

from __future__ import annotations

import array
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

from flwr_splitms.codecs import Payload, PayloadError, decode_bytes, get_codec

FIXED = struct.Struct("<4sBBBBBBH")
PARAMS = {"none": "", "qu": "B", "sp": "d", "rt": "dd", "ms": "dBBBBB"}
IDS = {"none": 0, "qu": 1, "sp": 2, "rt": 3, "ms": 4}


def blob_for(
    codec: str = "ms",
    params: tuple[object, ...] = (0.75, 2, 0, 0, 0, 0),
    shape: tuple[int, ...] = (16,),
    sections: tuple[bytes, ...] = (b"\xff" + b"\x00" * 3, b"\x00\x00\x80?" * 4),
    *,
    magic: bytes = b"FSMS",
    version: int = 1,
    codec_id: int | None = None,
    dtype: int = 0,
    flags: int = 0,
    lengths: tuple[int, ...] | None = None,
    plen: int | None = None,
    nsec: int | None = None,
) -> bytes:
    """Hand-written header (an independent spelling of the documented format)."""
    pfmt = struct.Struct("<" + PARAMS[codec])
    lengths = tuple(len(s) for s in sections) if lengths is None else lengths
    return (
        FIXED.pack(
            magic,
            version,
            IDS[codec] if codec_id is None else codec_id,
            dtype,
            flags,
            len(shape),
            len(lengths) if nsec is None else nsec,
            pfmt.size if plen is None else plen,
        )
        + pfmt.pack(*params)
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack(f"<{len(lengths)}Q", *lengths)
        + b"".join(sections)
    )


def test_hand_written_blob_decodes() -> None:
    # 16 elements, codes 3,3,3,3 then zeros: the first four are kept, each 1.0
    y = decode_bytes(blob_for())
    assert y.tolist() == [1.0] * 4 + [0.0] * 12


def test_header_layout_and_overhead() -> None:
    x = torch.relu(torch.randn(2, 3, 4, 5))
    expected = {"none": 52, "qu": 61, "sp": 68, "rt": 76, "ms": 73}
    for name, overhead in expected.items():
        p = get_codec(name).encode(x)
        blob = p.to_bytes()
        assert p.header_nbytes == overhead
        assert len(blob) == p.nbytes + overhead
        magic, version, cid, dcode, _flags, ndim, nsec, plen = FIXED.unpack_from(blob)
        assert (magic, version, cid, dcode, ndim) == (b"FSMS", 1, IDS[name], 0, 4)
        assert nsec == len(p.sections) and plen == struct.calcsize("<" + PARAMS[name])
        off = FIXED.size + plen
        assert struct.unpack_from("<4Q", blob, off) == (2, 3, 4, 5)
    # overhead grows by 8 bytes per dimension
    one_d = get_codec("ms").encode(x.reshape(-1))
    assert one_d.header_nbytes == 41 + 8
    assert get_codec("ms").encode(torch.tensor(1.0)).header_nbytes == 41


@pytest.mark.parametrize(
    ("dtype", "code"), [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 2)]
)
def test_dtype_codes(dtype: torch.dtype, code: int) -> None:
    blob = get_codec("none").encode(torch.ones(3, dtype=dtype)).to_bytes()
    assert blob[6] == code
    assert decode_bytes(blob).dtype == dtype


def test_values_are_little_endian_input_dtype() -> None:
    x = torch.tensor([1.5, -2.25])
    blob = get_codec("none").encode(x).to_bytes()
    assert blob.endswith(struct.pack("<2f", 1.5, -2.25))
    blob16 = get_codec("none").encode(x.half()).to_bytes()
    assert blob16.endswith(np.array([1.5, -2.25], dtype="<f2").tobytes())


def test_from_bytes_accepts_buffers() -> None:
    p = get_codec("ms").encode(torch.rand(3, 40))
    blob = p.to_bytes()
    assert Payload.from_bytes(bytearray(blob)) == p
    assert Payload.from_bytes(memoryview(blob)) == p
    padded = blob + b"\x00" * (-len(blob) % 4)
    words = array.array("I", padded)
    if len(padded) == len(blob):
        assert Payload.from_bytes(memoryview(words)) == p
    with pytest.raises(TypeError):
        Payload.from_bytes("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "truncated payload: 0 bytes"),
        (b"FSMS\x01", "truncated"),
        (blob_for(magic=b"PK\x03\x04"), "magic"),
        (blob_for(version=2), "unsupported payload format version 2"),
        (blob_for(version=0), "version 0"),
        (blob_for(codec_id=9), "unknown codec id 9"),
        (blob_for(dtype=3), "unknown dtype code 3"),
        (blob_for(nsec=3, lengths=(4, 16, 0)), "has 2 data sections, the header declares 3"),
        (blob_for(plen=12), "parameters take 13 bytes, the header declares 12"),
        (blob_for(params=(1.5, 2, 0, 0, 0, 0)), r"invalid 'ms' parameters.*ratio must be in"),
        (blob_for(params=(0.75, 0, 0, 0, 0, 0)), r"bits must be in 1\.\.8"),
        (blob_for(params=(0.75, 2, 2, 0, 0, 0)), "rounding: no choice has wire index 2"),
        (blob_for(params=(0.75, 2, 0, 3, 0, 0)), "signed: no choice"),
        (blob_for(params=(float("nan"), 2, 0, 0, 0, 0)), "ratio"),
        (blob_for() + b"\x00", "1 bytes of trailing garbage"),
        (blob_for()[:-1], "truncated payload: header declares 20 data bytes, 19 present"),
        (blob_for(lengths=(5, 15)), "inconsistent section lengths"),
        (blob_for(lengths=(2**63, 0)), "truncated"),
        (blob_for(shape=(15,)), "inconsistent section lengths"),
        (blob_for(flags=2), "no flag bits"),
        (blob_for(params=(0.75, 2, 0, 2, 0, 0), flags=1), "contradicts signed=False"),
        (blob_for(params=(0.75, 2, 0, 1, 0, 0), flags=0), "contradicts signed=True"),
        (blob_for(shape=(2**40,)), "limit is 2147483648"),
        (blob_for(shape=(2**31 + 1,)), "limit"),
        (blob_for(shape=(2**63, 2**63, 2**63)), "limit"),
        (blob_for(shape=(0, 2**63)), "size 0 counted as 1"),
        (blob_for(shape=(2**20, 0, 2**20)), "limit"),
        (blob_for(shape=(1,) * 33), "33 dimensions"),
    ],
)
def test_malformed_headers(blob: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        Payload.from_bytes(blob)
    with pytest.raises(PayloadError):
        decode_bytes(blob)


def test_gigantic_shape_is_rejected_without_allocating() -> None:
    # 2**31 elements declared (within the cap) but 20 data bytes present, and far beyond it
    blobs = [
        blob_for(shape=(2**31,)),
        blob_for(shape=(2**15, 2**16)),
        blob_for("none", (), shape=(2**31,), sections=(b"\x00" * 8,)),
        blob_for("none", (), shape=(2**62,), sections=(b"",), lengths=(2**63,)),
        blob_for("sp", (0.5,), shape=(2**31,), sections=(b"", b""), lengths=(2**28, 2**32)),
    ]
    tracemalloc.start()
    try:
        for blob in blobs:
            t0 = time.perf_counter()
            with pytest.raises(PayloadError):
                decode_bytes(blob)
            assert time.perf_counter() - t0 < 0.5
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decode_checks_layout_of_hand_built_payloads_before_allocating() -> None:
    huge = Payload("none", {}, (2**31,), torch.float32, (b"",))
    with pytest.raises(PayloadError, match="inconsistent section lengths"):
        get_codec("none").decode(huge)
    wrong_count = Payload("ms", get_codec("ms").params, (4,), torch.float32, (b"\x00",))
    with pytest.raises(PayloadError, match="inconsistent section lengths"):
        get_codec("ms").decode(wrong_count)
    bad_dtype = Payload("none", {}, (1,), torch.float64, (b"\x00" * 8,))
    with pytest.raises(PayloadError, match="unsupported dtype"):
        get_codec("none").decode(bad_dtype)
    with pytest.raises(ValueError, match="dimensions"):
        Payload("none", {}, (1,) * 33, torch.float32, (b"\x00" * 4,)).to_bytes()


# -- content validation: the header is consistent but the data is not --------------------------


def replace_section(payload: Payload, index: int, data: bytes) -> bytes:
    sections = list(payload.sections)
    sections[index] = data
    return Payload(
        payload.codec, payload.params, payload.shape, payload.dtype, tuple(sections), payload.flags
    ).to_bytes()


def test_ms_code_count_must_match_values() -> None:
    x = torch.tensor(
        [0.3, 2.5, 0.9, 0.0, 1.5, 0.2, 3.0, 1.1, 0.6, 2.1, 1.8, 0.0, 4.2, 0.8, 1.3, 0.5]
    )
    p = get_codec("ms", ratio=0.75).encode(x)
    mask = bytearray(p.sections[0])
    mask[0] |= 0b11  # one more 0b11 code: 5 kept positions, 4 values
    with pytest.raises(PayloadError, match="mask marks 5 kept positions"):
        decode_bytes(replace_section(p, 0, bytes(mask)))
    mask = bytearray(p.sections[0])
    mask[0] &= 0b11110011  # position 1 (a kept one) loses its code
    with pytest.raises(PayloadError, match="mask marks 3 kept positions"):
        decode_bytes(replace_section(p, 0, bytes(mask)))


def test_ms_sample_scope_counts_per_row() -> None:
    x = torch.rand(2, 8)
    p = get_codec("ms", ratio=0.75, scope="sample").encode(x)  # 2 kept per row
    stream = np.unpackbits(np.frombuffer(p.sections[0], np.uint8), bitorder="little")
    codes = stream.reshape(16, 2)
    row0 = [i for i in range(8) if codes[i].all()]
    free1 = next(i for i in range(8, 16) if not codes[i].all())
    codes[row0[0]] = 0  # move one kept code from row 0 to row 1: totals unchanged
    codes[free1] = 1
    moved = np.packbits(codes.reshape(-1), bitorder="little").tobytes()
    with pytest.raises(PayloadError, match="2 per row expected"):
        decode_bytes(replace_section(p, 0, moved))


def test_non_finite_values_in_payload() -> None:
    nan = struct.pack("<f", float("nan"))
    inf = struct.pack("<f", float("inf"))
    p = get_codec("ms", ratio=0.75).encode(torch.rand(16))
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_bytes(replace_section(p, 1, nan + p.sections[1][4:]))
    p = get_codec("sp", ratio=0.75).encode(torch.rand(16))
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_bytes(replace_section(p, 1, inf + p.sections[1][4:]))
    p = get_codec("none").encode(torch.rand(4))
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_bytes(replace_section(p, 0, p.sections[0][:4] + nan + p.sections[0][8:]))


def test_sp_positions_are_validated() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = get_codec("sp", ratio=0.99).encode(x)  # 10 indices (40 bytes) beat a 125-byte bitmap
    assert p.flags == 1
    idx = np.frombuffer(p.sections[0], dtype="<u4").copy()
    out_of_range = idx.copy()
    out_of_range[-1] = 1000
    with pytest.raises(PayloadError, match="out of range or not strictly increasing"):
        decode_bytes(replace_section(p, 0, out_of_range.tobytes()))
    repeated = idx.copy()
    repeated[1] = repeated[0]
    with pytest.raises(PayloadError, match="strictly increasing"):
        decode_bytes(replace_section(p, 0, repeated.tobytes()))
    flipped = Payload(p.codec, p.params, p.shape, p.dtype, p.sections, 0)
    with pytest.raises(PayloadError, match=r"inconsistent section lengths|position form"):
        decode_bytes(flipped.to_bytes())

    p = get_codec("sp", ratio=0.9).encode(x)  # bitmap: 125 bytes for 100 values
    assert p.flags == 0
    bitmap = bytearray(p.sections[0])
    bitmap[0] ^= 0xFF
    with pytest.raises(PayloadError, match="bitmap marks"):
        decode_bytes(replace_section(p, 0, bytes(bitmap)))


def test_padding_bits_must_be_zero() -> None:
    p = get_codec("ms", ratio=0.5, bits=3).encode(torch.rand(7))  # 21 bits -> 3 bytes
    mask = bytearray(p.sections[0])
    mask[-1] |= 0x80
    with pytest.raises(PayloadError, match="padding bits"):
        decode_bytes(replace_section(p, 0, bytes(mask)))
    p = get_codec("sp", ratio=0.5).encode(torch.rand(12))  # bitmap of 12 bits
    bitmap = bytearray(p.sections[0])
    bitmap[-1] |= 0x80
    with pytest.raises(PayloadError, match="padding bits"):
        decode_bytes(replace_section(p, 0, bytes(bitmap)))


def test_qu_range_is_validated() -> None:
    p = get_codec("qu").encode(torch.rand(10))
    for lo, hi in [(1.0, 0.0), (float("nan"), 1.0), (0.0, float("inf"))]:
        with pytest.raises(PayloadError, match="invalid quantization range"):
            decode_bytes(replace_section(p, 1, struct.pack("<ff", lo, hi)))
