"""The ``device`` key: auto picks the best device present; a missing one fails in one line."""

import pytest
import torch

from flwr_splitms import devices
from flwr_splitms.devices import available_devices, parse_device_spec, resolve_device


def no_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("auto", ("auto", None)), ("CPU", ("cpu", None)), ("cuda", ("cuda", None)),
     ("cuda:1", ("cuda", 1)), (" mps ", ("mps", None))],
)  # fmt: skip
def test_spec_syntax(spec: str, parsed: tuple[str, int | None]) -> None:
    assert parse_device_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "mps:1", "", "cuda:-1"])
def test_bad_spec_names_the_choices(spec: str) -> None:
    with pytest.raises(ValueError, match=r"not a device name; use one of auto, cpu, cuda"):
        resolve_device(spec)


def test_cpu_only_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    no_accelerators(monkeypatch)
    assert available_devices() == ["cpu"]
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError) as info:
            resolve_device(spec)
        message = str(info.value)
        assert "\n" not in message
        assert f"device {spec!r} is not available" in message and "available: cpu" in message


def test_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    two_gpus(monkeypatch)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' is not available.*cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_auto_prefers_mps_over_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    no_accelerators(monkeypatch)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert available_devices() == ["cpu", "mps"]


def test_this_machine() -> None:
    """Unpatched: auto always resolves, and cuda resolves exactly when torch sees a GPU."""
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match="'cuda' is not available"):
            resolve_device("cuda")
