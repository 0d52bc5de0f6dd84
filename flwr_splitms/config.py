"""Run configuration of a SplitFed experiment: one typed record for Flower's run-config.

The example app, the local engine, the presets in ``strategies/`` and the notebooks all read the
same keys, so a preset that works in ``flwr run`` works in a notebook too. Keys use Flower's
hyphenated style (``codec-ratio``); attributes use underscores (``codec_ratio``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CODEC_PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "qu": ("bits",),
    "sp": ("ratio",),
    "rt": ("ratio", "alpha"),
    "ms": ("ratio", "bits", "rounding", "signed", "scope"),
}
LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class SplitConfig:
    """All settings of one SplitFed run; defaults follow the paper (ResNet18, CIFAR-100, MS)."""

    dataset: str = "cifar100"
    data_root: str = "~/.cache/flwr-splitms/data"
    data_download: bool = True
    num_classes: int = 0  # 0 = the dataset's own number of classes
    synthetic_size: int = 5000  # training images of the synthetic set (test set: a fifth)
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    local_test_fraction: float = 0.0
    arch: str = "resnet18"
    cut: str = "shallow"
    codec: str = "ms"
    codec_ratio: float = 0.99
    codec_bits: int = 2
    codec_rounding: str = "nearest"
    codec_signed: str = "auto"
    codec_scope: str = "tensor"
    codec_alpha: float = 0.1
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    steps_per_round: int = 0  # 0 = one local epoch of the smallest sampled partition
    batch_size: int = 64
    eval_batch_size: int = 256
    eval_max_examples: int = 0  # 0 = the whole test set
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    augment: bool = True
    seed: int = 42
    output_dir: str = "outputs"
    step_timeout: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.codec not in CODEC_PARAM_KEYS:
            raise ValueError(
                f"unknown codec {self.codec!r}; choose one of {', '.join(CODEC_PARAM_KEYS)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr-schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        positive = ("batch_size", "eval_batch_size", "num_server_rounds")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_round", "eval_max_examples", "num_classes", "synthetic_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ValueError(
                f"local-test-fraction must be in [0, 1), got {self.local_test_fraction}"
            )
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    @property
    def codec_params(self) -> dict[str, Any]:
        """Parameters of the chosen codec, as ``get_codec(codec, **codec_params)`` takes them."""
        params = {name: getattr(self, f"codec_{name}") for name in CODEC_PARAM_KEYS[self.codec]}
        if "signed" in params:
            params["signed"] = {"true": True, "false": False}.get(
                params["signed"], params["signed"]
            )
        return params

    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys this record understands."""
        return [_key(f.name) for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, strict: bool = True) -> SplitConfig:
        """Build from Flower's run-config (hyphenated keys), checking names and types.

        With ``strict``, a key this record does not know is an error that names the closest valid
        key; without it, unknown keys are kept in ``extra`` (an app may add its own keys).
        """
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                if strict:
                    close = difflib.get_close_matches(key, cls.keys(), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"unknown run-config key {key!r}{hint} "
                        f"Valid keys: {', '.join(sorted(cls.keys()))}"
                    )
                extra[key] = value
                continue
            values[name] = _coerce(key, value, fields[name].default)
        return cls(**values, extra=extra)

    def to_run_config(self) -> dict[str, Any]:
        """The hyphenated key/value form (what ``flwr run --run-config`` takes)."""
        return {
            _key(f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }

    def replace(self, **changes: Any) -> SplitConfig:
        """A copy with some settings changed (underscore names)."""
        return dataclasses.replace(self, **changes)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check a run-config value against the type of the field's default."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
        if key == "codec-signed" and isinstance(value, bool):
            return "true" if value else "false"
    raise ValueError(
        f"run-config key {key!r} expects a {expected.__name__}, got {value!r} "
        f"({type(value).__name__})"
    )
