"""The study's Table 1 analog over seeds, as CSV and markdown, and its Fig. 3 curves as PNG.

Each seed's runs are compared with the *same seed's* uncompressed run (same initial weights and
data order): :func:`flwr_splitms.history.summary_table` per seed, then mean and standard
deviation (sample std, ``ddof=1``) over seeds. A policy's multiplier is averaged over the seeds
where it reaches the baseline accuracy; it is "INF" (the paper's mark for *failure*) when no
seed does, and the markdown says how many seeds reached when only some do.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from flwr_splitms.history import format_multiplier, summary_table
from flwr_splitms.storage import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from .spec import StudySpec

__all__ = ["STYLES", "plot_curves", "seed_summary", "summary_markdown", "write_summary"]

STYLES: dict[str, dict[str, Any]] = {
    "none": {"color": "black", "linestyle": "-", "marker": "o"},
    "qu": {"color": "tab:blue", "linestyle": ":", "marker": "s"},
    "sp": {"color": "tab:green", "linestyle": "--", "marker": "D"},
    "rt": {"color": "tab:purple", "linestyle": "-.", "marker": "v"},
    "ms": {"color": "tab:red", "linestyle": "-", "marker": "^"},
    "budget": {"color": "tab:orange", "linestyle": "--", "marker": "*"},  # strategies/budget.toml
}
"""Line styles of the paper's Fig. 3 (baseline black, QU blue dotted, SP green dashed, MS red)."""


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def seed_summary(
    histories: pd.DataFrame,
    baseline: str = "none",
    *,
    target: str | float = "final",
) -> pd.DataFrame:
    """One row per (cut, policy), aggregated over the ``seed`` column of ``histories``.

    Columns: ``seeds``; ``best_accuracy_mean/_std``, ``final_accuracy_mean/_std``;
    ``target_accuracy_mean`` (the baseline's accuracy each seed must reach); ``reached`` (seeds
    that reach it); for ``uplink`` and ``total`` traffic: ``<t>_to_target_mean`` (bytes, over the
    seeds that reach; inf if none) and ``<t>_multiplier_mean/_std`` (same seeds; inf if none);
    ``uplink_bytes_mean``, ``downlink_bytes_mean``, ``total_bytes_mean`` (whole run);
    ``uplink_saving`` and ``total_saving`` (the baseline's bytes per run / this policy's);
    ``compression_error_mean``.
    """
    if "seed" not in histories.columns:
        histories = histories.assign(seed=0)
    per_seed = []
    for seed, part in histories.groupby("seed", sort=True):
        tables = {
            t: summary_table(part, baseline, target=target, traffic=t)  # type: ignore[arg-type]
            for t in ("uplink", "total")
        }
        table = tables["uplink"].rename(
            columns={
                "traffic_to_target": "uplink_to_target",
                "traffic_saving_multiplier": "uplink_multiplier",
                "total_uplink_bytes": "uplink_bytes",
            }
        )
        table["total_to_target"] = tables["total"]["traffic_to_target"].to_numpy()
        table["total_multiplier"] = tables["total"]["traffic_saving_multiplier"].to_numpy()
        table["downlink_bytes"] = table["total_bytes"] - table["uplink_bytes"]
        errors = part.groupby(["cut", "policy"], dropna=False)["compression_error"].mean()
        table["compression_error"] = [
            errors.get((c, p), math.nan) for c, p in zip(table["cut"], table["policy"], strict=True)
        ]
        per_seed.append(table.assign(seed=seed))
    runs = pd.concat(per_seed, ignore_index=True)
    runs["cut"] = runs["cut"].fillna("")
    rows = []
    for (cut, policy), group in runs.groupby(["cut", "policy"], sort=False):
        reached = group[group["reaches_baseline"].fillna(False).astype(bool)]
        row: dict[str, Any] = {
            "cut": cut,
            "policy": policy,
            "seeds": len(group),
            "best_accuracy_mean": group["best_accuracy"].mean(),
            "best_accuracy_std": _std(group["best_accuracy"]),
            "final_accuracy_mean": group["final_accuracy"].mean(),
            "final_accuracy_std": _std(group["final_accuracy"]),
            "target_accuracy_mean": group["target_accuracy"].mean(),
            "reached": len(reached) if group["reaches_baseline"].notna().any() else math.nan,
        }
        for t in ("uplink", "total"):
            finite = reached[f"{t}_multiplier"].dropna()
            row[f"{t}_to_target_mean"] = (
                reached[f"{t}_to_target"].mean() if len(reached) else math.inf
            )
            if group["reaches_baseline"].isna().all():
                row[f"{t}_multiplier_mean"] = row[f"{t}_multiplier_std"] = math.nan
            else:
                row[f"{t}_multiplier_mean"] = finite.mean() if len(finite) else math.inf
                row[f"{t}_multiplier_std"] = _std(finite)
        for column in ("uplink_bytes", "downlink_bytes", "total_bytes", "compression_error"):
            row[f"{column}_mean"] = group[column].mean()
        rows.append(row)
    out = pd.DataFrame(rows)
    for t, column in (("uplink", "uplink_bytes_mean"), ("total", "total_bytes_mean")):
        base = out[out["policy"] == baseline].set_index("cut")[column]
        out[f"{t}_saving"] = [
            base.get(c, math.nan) / v if v > 0 else math.nan
            for c, v in zip(out["cut"], out[column], strict=True)
        ]
    out["cut"] = out["cut"].astype(object).where(out["cut"] != "", None)
    return out


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _multiplier_text(row: pd.Series, t: str) -> str:
    mean, std = row[f"{t}_multiplier_mean"], row[f"{t}_multiplier_std"]
    if math.isnan(mean):
        return ""
    if math.isinf(mean):
        return "INF"
    text = format_multiplier(mean) + ("" if math.isnan(std) else f" ± {std:.2f}")
    if row["reached"] < row["seeds"]:
        text += f" ({int(row['reached'])}/{row['seeds']} seeds; INF in the others)"
    return text


def _mb(value: float) -> str:
    return "never" if math.isinf(value) else ("" if math.isnan(value) else f"{value / 1e6:.2f}")


def summary_markdown(summary: pd.DataFrame, title: str, notes: str = "") -> str:
    """The summary as a markdown table (one row per cut and policy)."""
    header = (
        "| cut | policy | seeds | best acc (mean ± std) | final acc | reached | "
        "uplink MB to target | multiplier (uplink) | multiplier (total) | uplink MB/run | "
        "total MB/run | uplink saving | total saving | compression error |"
    )
    lines = [f"# {title}", "", notes, "", header, "|" + "---|" * 14]
    for _, row in summary.iterrows():
        reached = "" if math.isnan(row["reached"]) else f"{int(row['reached'])}/{row['seeds']}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(row["cut"] or ""),
                    str(row["policy"]),
                    str(row["seeds"]),
                    _pm(row["best_accuracy_mean"], row["best_accuracy_std"]),
                    _pm(row["final_accuracy_mean"], row["final_accuracy_std"]),
                    reached,
                    _mb(row["uplink_to_target_mean"]),
                    _multiplier_text(row, "uplink"),
                    _multiplier_text(row, "total"),
                    _mb(row["uplink_bytes_mean"]),
                    _mb(row["total_bytes_mean"]),
                    format_multiplier(row["uplink_saving"]),
                    format_multiplier(row["total_saving"]),
                    f"{row['compression_error_mean']:.4f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _mean_curves(histories: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean and std of ``y`` over seeds at each round (``x`` is averaged too)."""
    grouped = histories.groupby(["cut", "policy", "round"], sort=False, dropna=False)
    curves = grouped.agg(x=(x, "mean"), y=(y, "mean"), y_std=(y, "std")).reset_index()
    return curves.fillna({"y_std": 0.0})


def plot_curves(
    histories: pd.DataFrame, out: Path, *, title: str = "", baseline: str = "none"
) -> dict[str, Path]:
    """Fig. 3 analogs with error bars over seeds: accuracy vs rounds, accuracy vs traffic.

    Writes ``accuracy_vs_rounds.png`` (training loss and test accuracy per round, one row per
    cut) and ``accuracy_vs_traffic.png`` (test accuracy against cumulative uplink and total MB,
    log scale). Needs matplotlib (the ``notebooks`` extra); draws without pyplot (Agg).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the study figures need matplotlib: pip install 'flwr-splitms[notebooks]'"
        ) from err
    df = histories.copy()
    df["cut"] = df["cut"].fillna("")
    df["uplink_mb"] = df["cumulative_uplink_bytes"] / 1e6
    df["total_mb"] = df["cumulative_bytes"] / 1e6
    cuts = list(dict.fromkeys(df["cut"]))
    policies = list(dict.fromkeys(df["policy"]))
    seeds = df["seed"].nunique() if "seed" in df else 1
    panels = {
        "accuracy_vs_rounds.png": [
            ("round", "train_loss", "round", "training loss"),
            ("round", "test_accuracy", "round", "test accuracy"),
        ],
        "accuracy_vs_traffic.png": [
            ("uplink_mb", "test_accuracy", "cumulative uplink (MB, log)", "test accuracy"),
            ("total_mb", "test_accuracy", "cumulative up + down (MB, log)", "test accuracy"),
        ],
    }
    files = {}
    for filename, spec in panels.items():
        fig = Figure(figsize=(5.2 * len(spec), 3.4 * len(cuts)))
        axes = fig.subplots(len(cuts), len(spec), squeeze=False)
        for i, cut in enumerate(cuts):
            for j, (x, y, xlabel, ylabel) in enumerate(spec):
                ax = axes[i][j]
                curves = _mean_curves(df[df["cut"] == cut], x, y)
                for policy in policies:
                    c = curves[curves["policy"] == policy]
                    style = {"markersize": 4, "capsize": 2, **STYLES.get(policy, {})}
                    ax.errorbar(c["x"], c["y"], yerr=c["y_std"], label=policy, **style)
                if x != "round":
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{cut} cut" if cut else "", fontsize=10)
                ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(policies), fontsize=9)
        fig.suptitle(f"{title} (mean ± std over {seeds} seed(s))", fontsize=11)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        path = out / filename
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        files[filename.removesuffix(".png")] = atomic_write_bytes(path, buffer.getvalue())
    return files


def write_summary(
    spec: StudySpec,
    histories: pd.DataFrame,
    out: Path,
    *,
    figures: bool = True,
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Write ``summary.csv``, ``summary.md`` and (with ``figures``) the PNG curves to ``out``."""
    summary = seed_summary(histories, spec.baseline, target=spec.target)
    files = {"summary_csv": atomic_write_text(out / "summary.csv", summary.to_csv(index=False))}
    config = spec.runs()[0].config()
    notes = (
        f"{config.arch} on {config.dataset}, {spec.num_clients} clients, "
        f"{config.num_server_rounds} rounds of {config.steps_per_round or 'one epoch of'} steps, "
        f"batch {config.batch_size}, seeds {list(spec.seeds)}. Target: each seed's "
        f"'{spec.baseline}' run's {spec.target} test accuracy; a policy's multiplier is that "
        "run's traffic to the target divided by the policy's (same seed), averaged over the "
        "seeds that reach it. INF = never reaches it (the paper's mark for failure). Savings are "
        f"bytes per run of '{spec.baseline}' / the policy's."
    )
    text = summary_markdown(summary, f"Study '{spec.name}'", notes)
    files["summary_md"] = atomic_write_text(out / "summary.md", text)
    if figures:
        files.update(plot_curves(histories, out, title=f"Study '{spec.name}'"))
    return summary, files
