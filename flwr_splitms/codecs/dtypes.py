"""Element types on the wire: the supported input dtypes and their little-endian byte form.

Values travel in the input dtype (4 bytes for float32, 2 for float16/bfloat16). The wire is
little-endian on every host. Tensors move between bytes and any device (CPU, CUDA, MPS) with
one copy each way: ``tensor_to_bytes`` copies the raw bits to host memory once, and
``bytes_to_device`` uploads raw bytes once, after which the codecs work on the device.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "bytes_to_device",
    "dtype_code",
    "dtype_from_code",
    "itemsize",
    "resolve_device",
    "tensor_from_bytes",
    "tensor_to_bytes",
    "to_host_bytes",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

LITTLE_ENDIAN = sys.byteorder == "little"

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BY_CODE = {v: k for k, v in _CODES.items()}
# Integer views used to move raw bits (numpy has no bfloat16).
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_WIRE_INT = {torch.float32: "<i4", torch.float16: "<i2", torch.bfloat16: "<i2"}


def dtype_code(dtype: torch.dtype) -> int:
    """Wire code of a supported dtype."""
    return _CODES[dtype]


def dtype_from_code(code: int) -> torch.dtype:
    """Dtype for a wire code; KeyError for unknown codes."""
    return _BY_CODE[code]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per value of ``dtype`` on the wire."""
    return torch.empty((), dtype=dtype).element_size()


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``torch.device(device)``, the CPU for None; ValueError naming the problem otherwise."""
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}; use e.g. 'cpu' or 'cuda:0'") from None


def to_host_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a 1-D uint8 tensor on any device (one device-to-host copy)."""
    return t.contiguous().cpu().numpy().tobytes()


def bytes_to_device(buf: bytes | memoryview, device: torch.device) -> torch.Tensor:
    """A fresh, writable 1-D uint8 tensor on ``device`` holding ``buf``."""
    if len(buf) == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    host = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return host if device.type == "cpu" else host.to(device)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a 1-D tensor of a supported dtype, on any device."""
    bits = t.contiguous().view(_INT_VIEW[t.dtype]).cpu().numpy()
    if LITTLE_ENDIAN:
        return bits.tobytes()
    return np.asarray(bits, dtype=_WIRE_INT[t.dtype]).tobytes()


def tensor_from_bytes(
    buf: bytes | memoryview, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """1-D tensor of ``dtype`` on ``device`` (CPU by default) from little-endian bytes.

    Always a fresh, writable copy.
    """
    dev = torch.device("cpu") if device is None else device
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype, device=dev)
    if LITTLE_ENDIAN:
        return bytes_to_device(buf, dev).view(dtype)
    arr = np.frombuffer(buf, dtype=_WIRE_INT[dtype]).astype(_WIRE_INT[dtype][1:], copy=True)
    return torch.from_numpy(arr).view(dtype).to(dev)
