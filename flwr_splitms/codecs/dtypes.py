"""Element types on the wire: the supported input dtypes and their little-endian byte form.

Values travel in the input dtype (4 bytes for float32, 2 for float16/bfloat16). The wire is
little-endian on every host; the explicit ``<`` numpy dtypes make the conversion a no-op on
little-endian machines and a byte swap elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "dtype_code",
    "dtype_from_code",
    "itemsize",
    "tensor_from_bytes",
    "tensor_to_bytes",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BY_CODE = {v: k for k, v in _CODES.items()}
# Integer views used to move raw bits through numpy (numpy has no bfloat16).
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


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a 1-D CPU tensor of a supported dtype."""
    bits = t.contiguous().view(_INT_VIEW[t.dtype]).numpy()
    return np.asarray(bits, dtype=_WIRE_INT[t.dtype]).tobytes()


def tensor_from_bytes(buf: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """1-D tensor of ``dtype`` from little-endian bytes (a fresh, writable copy)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    arr = np.frombuffer(buf, dtype=_WIRE_INT[dtype]).astype(_WIRE_INT[dtype][1:], copy=True)
    return torch.from_numpy(arr).view(dtype)
