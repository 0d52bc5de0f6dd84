"""Fig. 2 on trained features: each codec's error on a trained model's activations, at equal bits.

The paper's claim (Sec. 4.2, Fig. 2) is that at the same compression MS reconstructs cut-layer
activations with a lower relative error ``||x - x_hat|| / ||x||`` than QU, SP and RT. That is a
claim about *trained* feature maps, and about *equal bits*: the paper's training policies spend
different budgets (MS 2.32 bits per element, QU 3). So this study

1. trains the split model uncompressed (the local engine, ``codec = "none"``), or loads a
   checkpoint it wrote before (``model.pt``);
2. takes the activations each cut sends (client part in training mode, as during split
   training) for a few batches of *held-out* images;
3. sweeps each codec over compression levels (QU bits, SP/RT keep ratios, MS ratio x mask bits)
   and records the measured bits per element, ``payload.nbytes * 8 / numel``, and the error;
4. interpolates each baseline's error curve at every MS point's bits per element and says
   whether MS is below or above it (:func:`compare_to_baselines`).

Study file: a ``[errors]`` table (below) and a ``[run-config]`` table for the training run::

    [errors]
    cuts = ["shallow", "medium", "deep"]
    num-clients = 1           # clients of the training run
    checkpoint = ""           # a model.pt to load instead of training
    batches = 4               # activation tensors per point
    batch-size = 32           # samples per tensor (what one client sends per step)
    qu-bits = [1, 2, 3, 4, 6, 8]
    sp-ratios = [0.99, 0.98, 0.97, 0.95875, 0.95, 0.9]
    rt-ratios = [0.99, 0.98, 0.97, 0.95875, 0.95, 0.9]
    rt-alpha = 0.1
    ms-ratios = [0.99, 0.98, 0.95]
    ms-bits = [1, 2, 3, 4]
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flwr_splitms.codecs import compression_error, get_codec
from flwr_splitms.config import SplitConfig
from flwr_splitms.experiment import evaluation_data, num_classes
from flwr_splitms.history import save_history
from flwr_splitms.models import cut_index, full_model
from flwr_splitms.storage import atomic_write_bytes, atomic_write_text, save_checkpoint

from .summary import STYLES

__all__ = [
    "BASELINES",
    "ErrorStudyResult",
    "ErrorStudySpec",
    "codec_settings",
    "compare_to_baselines",
    "run_error_study",
]

log = logging.getLogger("flwr")

BASELINES: tuple[str, ...] = ("qu", "sp", "rt")
"""The codecs MS is compared with."""

CHECKPOINT_NAME = "model.pt"


@dataclass(frozen=True)
class ErrorStudySpec:
    """Settings of the error study; see the module docstring for the study-file keys."""

    run_config: dict[str, Any] = field(default_factory=dict)
    cuts: tuple[str, ...] = ("shallow", "medium", "deep")
    num_clients: int = 1
    checkpoint: Path | None = None
    batches: int = 4
    batch_size: int = 32
    qu_bits: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    sp_ratios: tuple[float, ...] = (0.99, 0.98, 0.97, 0.95875, 0.95, 0.9)
    rt_ratios: tuple[float, ...] = (0.99, 0.98, 0.97, 0.95875, 0.95, 0.9)
    rt_alpha: float = 0.1
    ms_ratios: tuple[float, ...] = (0.99, 0.98, 0.95)
    ms_bits: tuple[int, ...] = (1, 2, 3, 4)

    def __post_init__(self) -> None:
        if not self.cuts:
            raise ValueError("the error study lists no cuts; give at least one")
        for name in ("num_clients", "batches", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        self.config()  # a bad run-config key fails now
        codec_settings(self)  # and so does a bad codec parameter

    def config(self) -> SplitConfig:
        """The training run's config: the run-config with ``codec = "none"`` (uncompressed)."""
        return SplitConfig.from_run_config({**self.run_config, "codec": "none"})

    @classmethod
    def from_toml(
        cls, path: str | Path, overrides: Mapping[str, Any] | None = None
    ) -> ErrorStudySpec:
        """Read ``[errors]`` and ``[run-config]``; ``errors.<key>`` overrides change the first,
        other overrides the run-config."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {path}")
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        unknown = sorted(set(data) - {"errors", "run-config"})
        if unknown:
            raise ValueError(f"unknown table(s) {unknown}; use [errors] and [run-config]")
        table = dict(data.get("errors", {}))
        run_config = dict(data.get("run-config", {}))
        for key, value in (overrides or {}).items():
            if key.startswith("errors."):
                table[key.removeprefix("errors.")] = value
            else:
                run_config[key] = value
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "run_config"}
        values: dict[str, Any] = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(n.replace("_", "-") for n in fields))
                raise ValueError(f"unknown [errors] key {key!r}; known: {known}")
            if name == "checkpoint":
                values[name] = (path.parent / Path(value).expanduser()) if value else None
            elif isinstance(value, list):
                values[name] = tuple(value)
            else:
                values[name] = value
        return cls(run_config=run_config, **values)


def codec_settings(spec: ErrorStudySpec) -> list[tuple[str, str, dict[str, Any]]]:
    """Every (codec, label, parameters) the sweep measures."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    out += [("qu", f"bits={b}", {"bits": b}) for b in spec.qu_bits]
    out += [("sp", f"ratio={r}", {"ratio": r}) for r in spec.sp_ratios]
    out += [("rt", f"ratio={r}", {"ratio": r, "alpha": spec.rt_alpha}) for r in spec.rt_ratios]
    out += [
        ("ms", f"ratio={r},bits={b}", {"ratio": r, "bits": b})
        for r in spec.ms_ratios
        for b in spec.ms_bits
    ]
    for name, label, params in out:
        try:
            get_codec(name, **params)
        except (TypeError, ValueError) as err:
            raise ValueError(f"error study: bad {name} setting {label}: {err}") from err
    return out


@dataclass
class ErrorStudyResult:
    """The measured points, MS against the baselines, the training history and the files."""

    errors: pd.DataFrame
    comparison: pd.DataFrame
    train_history: pd.DataFrame | None
    files: dict[str, Path]


def _trained_model(
    spec: ErrorStudySpec, out: Path, device: str
) -> tuple[torch.nn.Sequential, pd.DataFrame | None]:
    config = spec.config()
    model = full_model(config.arch, num_classes(config))
    if spec.checkpoint is not None:
        if not spec.checkpoint.is_file():
            raise FileNotFoundError(
                f"checkpoint not found: {spec.checkpoint}; drop errors.checkpoint to train"
            )
        saved = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
        state = saved.get("state_dict", saved) if isinstance(saved, dict) else saved
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{spec.checkpoint} does not fit {config.arch} with {num_classes(config)} "
                f"classes (set arch/num-classes to the checkpoint's): {err}"
            ) from err
        log.info("[errors] loaded %s", spec.checkpoint)
        return model, None
    from flwr_splitms.local import run_local

    steps = config.num_server_rounds * (config.steps_per_round or 0)
    log.info("[errors] training %s uncompressed (%s steps)", config.arch, steps or "epochs of")
    result = run_local(config, spec.num_clients, device=device)
    model.load_state_dict({**result.client_weights, **result.server_weights})
    save_checkpoint(
        out / CHECKPOINT_NAME,
        {"state_dict": model.state_dict(), "run_config": json.dumps(config.to_run_config())},
    )
    save_history(result.history, out / "train_history.csv")
    log.info(
        "[errors] trained: test accuracy %.3f after %d rounds",
        result.history["test_accuracy"].iloc[-1],
        len(result.history),
    )
    return model, result.history


def _activations(
    model: torch.nn.Sequential, spec: ErrorStudySpec, device: str
) -> dict[str, list[torch.Tensor]]:
    config = spec.config()
    held_out = evaluation_data(config)
    need = spec.batches * spec.batch_size
    if len(held_out) < need:
        raise ValueError(
            f"the held-out set has {len(held_out)} images, the study needs batches x batch-size "
            f"= {need}; lower errors.batches or errors.batch-size (or raise synthetic-size)"
        )
    images = [
        held_out.batch(torch.arange(i * spec.batch_size, (i + 1) * spec.batch_size))[0]
        for i in range(spec.batches)
    ]
    model = model.to(device).train()  # what a client sends during split training
    out = {}
    with torch.no_grad():
        for cut in spec.cuts:
            client = model[: cut_index(config.arch, cut)]
            out[cut] = [client(x.to(device)).cpu() for x in images]
    return out


def measure(
    codec_name: str, params: Mapping[str, Any], tensors: Sequence[torch.Tensor], seed: int
) -> tuple[float, float]:
    """Mean relative error and mean bits per element (data sections) of a codec on tensors."""
    codec = get_codec(codec_name, **params)
    errors, bits = [], []
    for i, x in enumerate(tensors):
        payload = codec.encode(x, generator=torch.Generator().manual_seed(seed + i), train=True)
        errors.append(compression_error(x, codec.decode(payload)))
        bits.append(payload.nbytes * 8 / x.numel())
    return float(np.mean(errors)), float(np.mean(bits))


def compare_to_baselines(errors: pd.DataFrame) -> pd.DataFrame:
    """MS against each baseline at MS's bits per element.

    For every MS point of a cut, each baseline's error is linearly interpolated between its two
    measured points that bracket MS's bits per element (its curve sorted by bits; the lower
    error where two points share a bit rate). ``verdict`` is ``"below"`` (MS has the lower
    error), ``"above"``, or ``"out of range"`` when the baseline was not measured on both sides.
    Columns: cut, setting, bits_per_element, ms_error, baseline, baseline_error, difference
    (MS minus baseline), verdict.
    """
    rows = []
    for cut, part in errors.groupby("cut", sort=False):
        ms = part[part["codec"] == "ms"]
        for baseline in BASELINES:
            points = part[part["codec"] == baseline]
            if points.empty:
                continue
            curve = points.groupby("bits_per_element")["relative_error"].min().sort_index()
            x, y = curve.index.to_numpy(), curve.to_numpy()
            for _, point in ms.iterrows():
                bpe = point["bits_per_element"]
                inside = x[0] <= bpe <= x[-1]
                value = float(np.interp(bpe, x, y)) if inside else float("nan")
                diff = point["relative_error"] - value
                verdict = "out of range" if not inside else ("below" if diff < 0 else "above")
                rows.append(
                    {
                        "cut": cut,
                        "setting": point["setting"],
                        "bits_per_element": bpe,
                        "ms_error": point["relative_error"],
                        "baseline": baseline,
                        "baseline_error": value,
                        "difference": diff,
                        "verdict": verdict,
                    }
                )
    return pd.DataFrame(rows)


def _plot(errors: pd.DataFrame, path: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    cuts = list(dict.fromkeys(errors["cut"]))
    fig = Figure(figsize=(4.2 * len(cuts), 3.6))
    axes = fig.subplots(1, len(cuts), squeeze=False)[0]
    for ax, cut in zip(axes, cuts, strict=True):
        part = errors[errors["cut"] == cut]
        for codec in BASELINES:
            c = part[part["codec"] == codec].sort_values("bits_per_element")
            ax.plot(
                c["bits_per_element"], c["relative_error"], label=codec.upper(), **STYLES[codec]
            )
        ms = part[part["codec"] == "ms"]
        for i, (ratio, c) in enumerate(ms.groupby("ratio", sort=True)):
            c = c.sort_values("bits_per_element")
            style = {**STYLES["ms"], "alpha": 1.0 - 0.25 * i}
            ax.plot(c["bits_per_element"], c["relative_error"], label=f"MS r={ratio}", **style)
        ax.set_xscale("log")
        ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if t <= part["bits_per_element"].max()]
        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per element (measured, log scale)")
        ax.set_title(f"{cut} cut {part['shape'].iloc[0]}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error ||x - x̂|| / ||x||")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return atomic_write_bytes(path, buffer.getvalue())


def run_error_study(
    spec: ErrorStudySpec, out: str | Path, *, device: str = "cpu", figures: bool = True
) -> ErrorStudyResult:
    """Train (or load), measure every codec setting at every cut, compare, write files.

    Writes ``errors.csv`` (cut, shape, codec, setting, ratio, bits, bits_per_element,
    relative_error), ``errors_vs_baselines.csv`` (:func:`compare_to_baselines`), ``model.pt``
    and ``train_history.csv`` when it trained, and ``errors.png``; logs, per cut and baseline,
    at how many MS points MS is below it.
    """
    out = Path(out).expanduser()
    model, history = _trained_model(spec, out, device)
    activations = _activations(model, spec, device)
    settings = codec_settings(spec)
    seed = spec.config().seed
    rows = []
    for cut, tensors in activations.items():
        shape = "x".join(map(str, tensors[0].shape[1:]))
        for codec, label, params in settings:
            error, bpe = measure(codec, params, tensors, seed)
            rows.append(
                {
                    "cut": cut,
                    "shape": shape,
                    "codec": codec,
                    "setting": label,
                    "ratio": params.get("ratio", np.nan),
                    "bits": params.get("bits", np.nan),
                    "bits_per_element": bpe,
                    "relative_error": error,
                }
            )
        log.info("[errors] %s cut (%s): %d settings measured", cut, shape, len(settings))
    errors = pd.DataFrame(rows)
    comparison = compare_to_baselines(errors)
    files = {
        "errors_csv": atomic_write_text(out / "errors.csv", errors.to_csv(index=False)),
        "comparison_csv": atomic_write_text(
            out / "errors_vs_baselines.csv", comparison.to_csv(index=False)
        ),
    }
    if history is not None:
        files["checkpoint"] = out / CHECKPOINT_NAME
    for (cut_name, baseline), part in comparison.groupby(["cut", "baseline"], sort=False):
        counts = part["verdict"].value_counts()
        log.info(
            "[errors] %s cut: MS below %s at %d of %d MS settings, above at %d, out of its "
            "measured range at %d",
            cut_name,
            str(baseline).upper(),
            counts.get("below", 0),
            len(part),
            counts.get("above", 0),
            counts.get("out of range", 0),
        )
    if figures:
        config = spec.config()
        accuracy = "" if history is None else f", test acc {history['test_accuracy'].iloc[-1]:.3f}"
        title = f"Relative error at equal bits: {config.arch} on {config.dataset}{accuracy}"
        files["errors_png"] = _plot(errors, out / "errors.png", title)
    return ErrorStudyResult(errors, comparison, history, files)
