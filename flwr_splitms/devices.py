"""Which torch device a run uses: the ``device`` run-config key.

``"auto"`` picks CUDA when a GPU is visible, else Apple's MPS when present, else the CPU;
``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` name one. A device that is not there fails at
start with one line that names it and the devices that are, instead of a CUDA error in the
middle of the first round. Under Flower's simulation engine each client sees only the GPUs its
``client-resources`` grant it (``CUDA_VISIBLE_DEVICES``), so ``"cuda"`` is its own share.
"""

from __future__ import annotations

import re

import torch

__all__ = ["DEVICE_SPECS", "available_devices", "parse_device_spec", "resolve_device"]

DEVICE_SPECS = "auto, cpu, cuda, cuda:N, mps"
_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """Split a device spec into (kind, index) without touching any hardware.

    Raises ValueError for anything that is not one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``,
    ``mps`` (checked before a run starts, on a machine that may lack the device).
    """
    match = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"device {spec!r} is not a device name; use one of {DEVICE_SPECS}")
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices this process can use, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device for a ``device`` run-config value; ValueError when it is not here.

    ``"cuda"`` means the current CUDA device (``cuda:0`` unless changed), returned with its index
    so that device comparisons hold.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    kind, index = parse_device_spec(spec)
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif _mps_available():
            kind = "mps"
        else:
            kind = "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ValueError(_missing(spec))
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(_missing(spec))
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(_missing(spec))
    return torch.device("cuda", index)


def _missing(spec: str) -> str:
    return (
        f"device {spec!r} is not available in this process; available: "
        f'{", ".join(available_devices())} (set device="auto" to use the best one present)'
    )
