"""Per-round metrics of SplitFed runs as pandas DataFrames, and the paper's traffic measures.

A run (the local engine's ``run_local(...).history`` or the Flower example's ``history.csv``) is a
table with one row per round. The bytes columns are *per round*; this module adds the cumulative
sums and computes the paper's Table 1 quantity:

* :func:`traffic_to_accuracy` -- bytes sent until the test accuracy first reaches a target;
* :func:`traffic_saving_multiplier` -- Table 1 of Zhou et al. (ECAI 2024): the traffic the
  uncompressed baseline needs to reach its own accuracy, divided by the traffic a compressed
  policy needs to reach that same accuracy. A policy that never reaches it gets ``math.inf``,
  which the paper prints as "INF" and defines as *failure to reach the baseline accuracy* (not as
  an infinitely good saving); :func:`format_multiplier` renders it that way;
* :func:`network_time` -- transfer time over the paper's 100 Mbps link.

Traffic is counted on one direction or both: ``traffic="uplink"`` (the compressed activations,
what the paper's Table 1 counts), ``"downlink"`` (the gradients sent back) or ``"total"``
(uplink + downlink, what a user pays for; the ``total_bytes`` column).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from flwr_splitms.storage import atomic_write_text

__all__ = [
    "HISTORY_COLUMNS",
    "REQUIRED_COLUMNS",
    "TRAFFIC",
    "format_multiplier",
    "load_history",
    "multiplier_table",
    "network_time",
    "save_history",
    "summary_table",
    "traffic_saving_multiplier",
    "traffic_to_accuracy",
    "with_total_bytes",
]

HISTORY_COLUMNS: tuple[str, ...] = (
    "round",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_top5",
    "uplink_bytes",
    "uplink_raw_bytes",
    "downlink_bytes",
    "total_bytes",
    "compression_error",
    "client_seconds",
    "server_seconds",
    "message_seconds",
    "lr",
    "steps",
    "num_clients",
    "dropped_clients",
)
"""Columns written by the local engine and the Flower example (one row per round)."""

REQUIRED_COLUMNS: tuple[str, ...] = ("round", "test_accuracy", "uplink_bytes", "downlink_bytes")
"""Columns :func:`load_history` insists on; the others are optional."""

HISTORY_FILENAME = "history.csv"
SIDECAR_FILENAME = "run.json"
RUN_KEYS: tuple[str, ...] = ("run", "policy", "cut")
"""Columns that identify one run inside a concatenated history."""

Target = float | Literal["final", "best"]
Traffic = Literal["uplink", "downlink", "total"]
TRAFFIC: dict[str, str] = {
    "uplink": "uplink_bytes",
    "downlink": "downlink_bytes",
    "total": "total_bytes",
}
"""The ``traffic=`` choices and the per-round bytes column each one sums."""


def with_total_bytes(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``total_bytes`` = uplink + downlink filled in wherever it is missing or NaN.

    Histories written before the column existed (or by an engine that leaves it empty) get it
    computed; values an engine wrote are kept.
    """
    total = df["uplink_bytes"] + df["downlink_bytes"]
    out = df.copy()
    out["total_bytes"] = df["total_bytes"].fillna(total) if "total_bytes" in df else total
    return out


def save_history(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a history DataFrame to ``path`` as CSV, atomically (no index column)."""
    return atomic_write_text(path, df.to_csv(index=False))


def load_history(
    paths: str | Path | Sequence[str | Path],
    *,
    policy: str | None = None,
    cut: str | None = None,
) -> pd.DataFrame:
    """Load one or many ``history.csv`` files into one DataFrame.

    ``paths`` may name files or directories (a directory stands for every ``history.csv`` below
    it). Each run gets the columns ``run`` (the csv path), ``policy`` and ``cut``: from the
    arguments if given, else from a ``run.json`` next to the csv (keys ``"policy"`` or
    ``"codec"``, and ``"cut"``), else from the folder names (policy = the csv's parent folder, cut
    = its grandparent when that is shallow/medium/deep); a csv written from an earlier
    ``load_history`` result keeps its own ``run``/``policy``/``cut`` columns unless the arguments
    override them. ``cumulative_uplink_bytes`` and ``cumulative_bytes`` (uplink + downlink) are
    added per run, in round order.

    Raises:
        FileNotFoundError: a path does not exist, or a directory holds no ``history.csv``.
        ValueError: a csv lacks one of :data:`REQUIRED_COLUMNS` (named in the message).
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError("load_history needs at least one path")
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(path.rglob(HISTORY_FILENAME))
            if not found:
                raise FileNotFoundError(f"no {HISTORY_FILENAME} below {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"history file not found: {path}")
    frames = [_load_one(file, policy=policy, cut=cut) for file in files]
    return pd.concat(frames, ignore_index=True)


def _load_one(path: Path, *, policy: str | None, cut: str | None) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    df = with_total_bytes(df)
    sidecar = _read_sidecar(path.parent / SIDECAR_FILENAME)
    # A csv saved from an earlier load_history keeps its labels unless the arguments override.
    if policy is None and "policy" not in df.columns:
        policy = str(sidecar.get("policy") or sidecar.get("codec") or path.parent.name)
    if cut is None and "cut" not in df.columns:
        cut = sidecar.get("cut") or _cut_from_folders(path)
    if "run" not in df.columns:
        df["run"] = str(path)
    for key, value in (("policy", policy), ("cut", cut)):
        if value is not None or key not in df.columns:
            df[key] = value
    front = list(RUN_KEYS)
    df = df[front + [c for c in df.columns if c not in front]]
    df = df.sort_values(["run", "round"], kind="stable").reset_index(drop=True)
    per_run = df.groupby("run", sort=False, dropna=False)
    df["cumulative_uplink_bytes"] = per_run["uplink_bytes"].cumsum()
    df["cumulative_bytes"] = per_run["total_bytes"].cumsum()
    return df


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON object ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _cut_from_folders(path: Path) -> str | None:
    for folder in (path.parent.parent.name, path.parent.name):
        if folder in ("shallow", "medium", "deep"):
            return folder
    return None


def _traffic(history: pd.DataFrame, traffic: str) -> pd.Series:
    """Per-round bytes of ``traffic``: ``"uplink"``, ``"downlink"``, ``"total"`` or a column."""
    column = TRAFFIC.get(traffic, traffic)
    if column == "total_bytes":
        return with_total_bytes(history)["total_bytes"]
    if column not in history.columns:
        raise ValueError(
            f"no traffic column {traffic!r}; use one of {', '.join(TRAFFIC)} or a bytes column "
            f"({', '.join(c for c in history.columns if c.endswith('_bytes'))})"
        )
    return history[column]


def _one_run(history: pd.DataFrame, column: str) -> pd.DataFrame:
    """Check that ``history`` is one run, and return it in round order."""
    if history.empty:
        raise ValueError("empty history")
    for key in RUN_KEYS:
        if key in history.columns and history[key].nunique(dropna=False) > 1:
            values = ", ".join(map(str, history[key].unique()))
            raise ValueError(f"history holds several runs ({key}: {values}); pass one run")
    if column not in history.columns:
        raise ValueError(f"no column {column!r}; columns: {', '.join(history.columns)}")
    if "round" in history.columns:
        history = history.sort_values("round", kind="stable")
    return history


def traffic_to_accuracy(
    history: pd.DataFrame,
    target: float,
    *,
    column: str = "test_accuracy",
    traffic: Traffic | str = "uplink",
) -> float:
    """Bytes sent (summed per round, in round order) until ``column`` first reaches ``target``.

    The round that reaches the target counts in full (the accuracy is measured after its
    training). Rounds whose ``column`` is NaN (not evaluated) count their bytes but cannot reach
    the target. Returns ``math.inf`` if the target is never reached. ``traffic``: ``"uplink"``
    (default, the compressed smashed data), ``"downlink"``, ``"total"`` (uplink + downlink) or
    the name of a bytes column.
    """
    run = _one_run(history, column)
    cumulative = _traffic(run, traffic).cumsum().to_numpy()
    reached = (run[column] >= target).to_numpy()
    if not reached.any():
        return math.inf
    return float(cumulative[reached.argmax()])


def _resolve_target(baseline: pd.DataFrame, target: Target, column: str) -> float:
    if target == "final":
        values = baseline[column].dropna()
        if values.empty:
            raise ValueError(f"baseline has no {column} values")
        return float(values.iloc[-1])
    if target == "best":
        return float(baseline[column].max())
    if isinstance(target, int | float) and not isinstance(target, bool):
        return float(target)
    raise ValueError(f"target must be a number, 'final' or 'best', got {target!r}")


def traffic_saving_multiplier(
    baseline: pd.DataFrame,
    other: pd.DataFrame,
    *,
    target: Target = "final",
    column: str = "test_accuracy",
    traffic: Traffic | str = "uplink",
) -> float:
    """The paper's Table 1 "traffic saving multiplier" of ``other`` against ``baseline``.

    ``T_base / T_other`` where ``T_x`` = :func:`traffic_to_accuracy` of run x for the target
    accuracy, by default the uncompressed baseline's own final accuracy (``target="final"``;
    ``"best"`` uses its maximum, as the authors' plots draw the baseline line, or pass a number).
    Table 1 counts the traffic of the compressed cut-layer activations, hence the default
    ``traffic="uplink"``; ``"total"`` counts the gradients sent back too (``"downlink"`` alone
    is also accepted).

    Returns ``math.inf`` when ``other`` never reaches the target: the paper marks exactly that
    case "INF" ("failure to achieve baseline accuracy level"), so INF means *failed*, not an
    unbounded saving. Raises ValueError if the baseline itself never reaches an explicit target
    or reaches it with zero traffic.
    """
    base = _one_run(baseline, column)
    level = _resolve_target(base, target, column)
    base_traffic = traffic_to_accuracy(base, level, column=column, traffic=traffic)
    other_traffic = traffic_to_accuracy(other, level, column=column, traffic=traffic)
    return _ratio(base_traffic, other_traffic, f"{column} >= {level}")


def _ratio(base_traffic: float, other_traffic: float, what: str) -> float:
    if math.isinf(base_traffic):
        raise ValueError(f"the baseline never reaches {what}")
    if base_traffic <= 0 or other_traffic <= 0:
        raise ValueError(f"a run reaches {what} with no traffic; the multiplier is undefined")
    if math.isinf(other_traffic):
        return math.inf
    return base_traffic / other_traffic


def format_multiplier(value: float, digits: int = 2) -> str:
    """Render a multiplier as the paper's Table 1 does: ``"13.11×"``, or ``"INF"`` (failure)."""
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "INF"
    return f"{value:.{digits}f}×"


def network_time(
    nbytes: float,
    uplink_mbps: float = 100.0,
    downlink_mbps: float = 100.0,
    downlink_bytes: float = 0,
) -> float:
    """Seconds to send ``nbytes`` up and ``downlink_bytes`` down (1 Mbps = 10^6 bit/s).

    The defaults are the paper's testbed: a 100 Mbps wireless link between clients and server.
    Transfer time only: no latency, no protocol overhead.
    """
    if uplink_mbps <= 0 or downlink_mbps <= 0:
        raise ValueError("link rates must be positive")
    if nbytes < 0 or downlink_bytes < 0:
        raise ValueError("byte counts must be non-negative")
    return float(nbytes) * 8 / (uplink_mbps * 1e6) + float(downlink_bytes) * 8 / (
        downlink_mbps * 1e6
    )


SUMMARY_COLUMNS: tuple[str, ...] = (
    "cut",
    "policy",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "total_uplink_bytes",
    "total_bytes",
    "bytes_saved_pct",
    "target_accuracy",
    "traffic_to_target",
    "reaches_baseline",
    "traffic_saving_multiplier",
    "uplink_seconds",
)


def summary_table(
    histories: pd.DataFrame,
    baseline_policy: str = "none",
    *,
    target: Target = "final",
    column: str = "test_accuracy",
    traffic: Traffic | str = "uplink",
    uplink_mbps: float = 100.0,
) -> pd.DataFrame:
    """One row per (cut, policy): accuracy, traffic and the Table 1 multiplier vs the baseline.

    ``histories`` is :func:`load_history`'s output (columns ``policy`` and, optionally, ``cut``
    and ``run``); each (cut, policy) must be a single run. Columns: :data:`SUMMARY_COLUMNS`.
    ``bytes_saved_pct`` is ``100 * (1 - uplink_bytes / uplink_raw_bytes)`` summed over the run
    (NaN without ``uplink_raw_bytes``); ``target_accuracy`` is the same cut's baseline accuracy
    (its final one by default); ``traffic_to_target`` the ``traffic`` bytes the policy needs to
    reach it (inf if never); ``traffic_saving_multiplier`` as :func:`traffic_saving_multiplier`
    (inf = never reached, the paper's "INF"; NaN when undefined: the cut has no baseline run,
    the baseline misses an explicit target, or a run reaches it with zero traffic);
    ``uplink_seconds`` the whole run's uplink at ``uplink_mbps``.
    """
    if "policy" not in histories.columns:
        raise ValueError("histories need a 'policy' column (use load_history)")
    df = histories.copy()
    if "cut" not in df.columns:
        df["cut"] = None
    df["cut"] = df["cut"].astype(object).where(df["cut"].notna(), "")
    rows: list[dict[str, Any]] = []
    for cut_value, by_cut in df.groupby("cut", sort=False):
        runs = {
            str(name): _one_run(run, column) for name, run in by_cut.groupby("policy", sort=False)
        }
        baseline = runs.get(baseline_policy)
        level = base_traffic = math.nan
        if baseline is not None:
            level = _resolve_target(baseline, target, column)
            base_traffic = traffic_to_accuracy(baseline, level, column=column, traffic=traffic)
        for name, run in runs.items():
            uplink = float(run["uplink_bytes"].sum())
            raw = float(run["uplink_raw_bytes"].sum()) if "uplink_raw_bytes" in run else math.nan
            row: dict[str, Any] = {
                "cut": cut_value or None,
                "policy": name,
                "rounds": len(run),
                "final_accuracy": float(run[column].dropna().iloc[-1])
                if run[column].notna().any()
                else math.nan,
                "best_accuracy": float(run[column].max()),
                "total_uplink_bytes": uplink,
                "total_bytes": uplink + float(run["downlink_bytes"].sum()),
                "bytes_saved_pct": 100.0 * (1.0 - uplink / raw) if raw > 0 else math.nan,
                "target_accuracy": level,
                "traffic_to_target": math.nan,
                "reaches_baseline": None,
                "traffic_saving_multiplier": math.nan,
                "uplink_seconds": network_time(uplink, uplink_mbps=uplink_mbps),
            }
            if baseline is not None:
                spent = traffic_to_accuracy(run, level, column=column, traffic=traffic)
                row["traffic_to_target"] = spent
                row["reaches_baseline"] = not math.isinf(spent)
                if 0 < base_traffic < math.inf and spent > 0:  # else undefined: NaN
                    row["traffic_saving_multiplier"] = _ratio(base_traffic, spent, str(level))
            rows.append(row)
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def multiplier_table(summary: pd.DataFrame, baseline_policy: str = "none") -> pd.DataFrame:
    """Table 1's layout: one row per cut, one column per compressed policy, "13.11×" / "INF"."""
    rest = summary[summary["policy"] != baseline_policy].copy()
    rest["multiplier"] = rest["traffic_saving_multiplier"].map(format_multiplier)
    rest["cut"] = rest["cut"].fillna("")
    table = rest.pivot(index="cut", columns="policy", values="multiplier")
    table = table.reindex(columns=list(dict.fromkeys(rest["policy"])))
    order = {"shallow": 0, "medium": 1, "deep": 2}
    table = table.loc[sorted(table.index, key=lambda c: (order.get(c, 3), c))]
    table.columns.name = None
    return table
