"""flwr_splitms.history on hand-made histories whose answers are computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from flwr_splitms.history import (
    HISTORY_COLUMNS,
    format_multiplier,
    load_history,
    multiplier_table,
    network_time,
    save_history,
    summary_table,
    traffic_saving_multiplier,
    traffic_to_accuracy,
    with_total_bytes,
)


def run(acc: list[float], uplink: float, downlink: float = 500.0, raw: float = 1000.0):
    """A four-round history with constant per-round bytes."""
    n = len(acc)
    return pd.DataFrame(
        {
            "round": list(range(1, n + 1)),
            "train_loss": [2.0 - 0.1 * i for i in range(n)],
            "test_accuracy": acc,
            "uplink_bytes": [uplink] * n,
            "uplink_raw_bytes": [raw] * n,
            "downlink_bytes": [downlink] * n,
        }
    )


# Baseline: final accuracy 0.55, first reached in round 3 (0.6 >= 0.55) -> 3 * 1000 = 3000 B.
BASE = run([0.2, 0.5, 0.6, 0.55], uplink=1000)
MS = run([0.1, 0.3, 0.56, 0.7], uplink=75)  # reaches 0.55 in round 3: 225 B -> 13.33x
SP = run([0.1, 0.2, 0.3, 0.4], uplink=40)  # never reaches 0.55 -> INF
QU = run([0.2, 0.4, 0.5, 0.55], uplink=100)  # reaches 0.55 in round 4: 400 B -> 7.5x


def test_traffic_to_accuracy_counts_rounds_up_to_first_reach():
    assert traffic_to_accuracy(BASE, 0.55) == 3000
    assert traffic_to_accuracy(BASE, 0.2) == 1000
    assert traffic_to_accuracy(BASE, 0.6) == 3000
    assert traffic_to_accuracy(MS, 0.55) == 225
    assert traffic_to_accuracy(QU, 0.55) == 400
    assert traffic_to_accuracy(SP, 0.55) == math.inf
    assert traffic_to_accuracy(BASE, 0.61) == math.inf


def test_traffic_to_accuracy_total_and_other_columns():
    # uplink + downlink: (1000 + 500) * 3
    assert traffic_to_accuracy(BASE, 0.55, traffic="total") == 4500
    assert traffic_to_accuracy(BASE, 0.55, traffic="downlink_bytes") == 1500
    # another metric column: train loss 2.0, 1.9, 1.8, 1.7 -> ">= 1.9" first in round 1
    assert traffic_to_accuracy(BASE, 1.9, column="train_loss") == 1000
    with pytest.raises(ValueError, match="nope"):
        traffic_to_accuracy(BASE, 0.5, traffic="nope")
    with pytest.raises(ValueError, match="nope"):
        traffic_to_accuracy(BASE, 0.5, column="nope")


def test_traffic_to_accuracy_nan_rounds_and_order():
    df = pd.DataFrame(
        {
            "round": [3, 1, 4, 2],
            "test_accuracy": [math.nan, math.nan, 0.7, 0.5],
            "uplink_bytes": [30, 10, 40, 20],
            "downlink_bytes": [0, 0, 0, 0],
        }
    )
    # round order 1..4: bytes 10, 20, 30, 40; accuracy nan, 0.5, nan, 0.7
    assert traffic_to_accuracy(df, 0.5) == 30
    assert traffic_to_accuracy(df, 0.6) == 100


def test_traffic_to_accuracy_rejects_several_runs():
    both = pd.concat([BASE.assign(policy="none"), MS.assign(policy="ms")])
    with pytest.raises(ValueError, match="several runs"):
        traffic_to_accuracy(both, 0.5)


def test_traffic_saving_multiplier_matches_hand_values():
    assert traffic_saving_multiplier(BASE, MS) == pytest.approx(3000 / 225)
    assert traffic_saving_multiplier(BASE, QU) == pytest.approx(7.5)
    assert traffic_saving_multiplier(BASE, SP) == math.inf  # the paper's "INF": never reached
    assert traffic_saving_multiplier(BASE, BASE) == pytest.approx(1.0)


def test_traffic_saving_multiplier_targets_and_traffic():
    # best baseline accuracy 0.6: baseline 3000 B, MS reaches 0.6 in round 4: 300 B
    assert traffic_saving_multiplier(BASE, MS, target="best") == pytest.approx(10.0)
    # explicit target 0.5: baseline round 2 (2000 B), MS round 3 (225 B)
    assert traffic_saving_multiplier(BASE, MS, target=0.5) == pytest.approx(2000 / 225)
    # total traffic: 4500 vs (75 + 500) * 3
    assert traffic_saving_multiplier(BASE, MS, traffic="total") == pytest.approx(4500 / 1725)
    with pytest.raises(ValueError, match="never reaches"):
        traffic_saving_multiplier(BASE, MS, target=0.9)
    with pytest.raises(ValueError, match="target"):
        traffic_saving_multiplier(BASE, MS, target="median")  # type: ignore[arg-type]


def test_traffic_saving_multiplier_zero_traffic_is_an_error():
    free = run([0.6, 0.6, 0.6, 0.6], uplink=0)
    with pytest.raises(ValueError, match="no traffic"):
        traffic_saving_multiplier(BASE, free)


def test_format_multiplier():
    assert format_multiplier(13.111) == "13.11×"
    assert format_multiplier(math.inf) == "INF"
    assert format_multiplier(math.nan) == ""
    assert format_multiplier(9.9166, digits=1) == "9.9×"


def test_network_time_uses_megabits():
    assert network_time(12_500_000) == pytest.approx(1.0)  # 100 Mbit at 100 Mbps
    assert network_time(12_500_000, uplink_mbps=10) == pytest.approx(10.0)
    assert network_time(0, downlink_bytes=12_500_000, downlink_mbps=50) == pytest.approx(2.0)
    assert network_time(12_500_000, downlink_bytes=12_500_000) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        network_time(1, uplink_mbps=0)
    with pytest.raises(ValueError):
        network_time(-1)


def _write(df: pd.DataFrame, path: Path, sidecar: dict | None = None) -> Path:
    save_history(df, path)
    if sidecar is not None:
        (path.parent / "run.json").write_text(json.dumps(sidecar))
    return path


def test_save_history_round_trips(tmp_path: Path):
    path = _write(BASE, tmp_path / "a" / "history.csv")
    back = pd.read_csv(path)
    pd.testing.assert_frame_equal(back, BASE, check_dtype=False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["history.csv"]  # no temp files


def test_load_history_labels_from_folders_sidecar_and_arguments(tmp_path: Path):
    _write(MS, tmp_path / "shallow" / "ms" / "history.csv")
    _write(SP, tmp_path / "x" / "history.csv", {"codec": "sp", "cut": "deep", "lr": 0.1})
    _write(QU, tmp_path / "y" / "history.csv", {"policy": "qu3", "codec": "qu"})

    df = load_history(tmp_path)
    labels = df.groupby("run")[["policy", "cut"]].first().reset_index()
    got = {Path(r).parent.name: (p, c) for r, p, c in labels.itertuples(index=False, name=None)}
    assert got == {"ms": ("ms", "shallow"), "x": ("sp", "deep"), "y": ("qu3", None)}
    assert len(df) == 12

    one = load_history(tmp_path / "x" / "history.csv", policy="rt", cut="medium")
    assert set(one["policy"]) == {"rt"} and set(one["cut"]) == {"medium"}


def test_load_history_cumulative_columns(tmp_path: Path):
    shuffled = MS.iloc[[2, 0, 3, 1]]
    path = _write(shuffled, tmp_path / "ms" / "history.csv")
    df = load_history([path])
    assert list(df["round"]) == [1, 2, 3, 4]
    assert list(df["cumulative_uplink_bytes"]) == [75, 150, 225, 300]
    assert list(df["cumulative_bytes"]) == [575, 1150, 1725, 2300]


def test_combined_history_survives_save_and_load(tmp_path: Path):
    _write(MS, tmp_path / "runs" / "deep" / "ms" / "history.csv")
    _write(BASE, tmp_path / "runs" / "deep" / "none" / "history.csv")
    combined = load_history(tmp_path / "runs")
    save_history(combined, tmp_path / "all.csv")
    back = load_history(tmp_path / "all.csv")
    assert sorted(set(back["policy"])) == ["ms", "none"] and set(back["cut"]) == {"deep"}
    ms = back[back["policy"] == "ms"]
    assert list(ms["cumulative_uplink_bytes"]) == [75, 150, 225, 300]  # per run, not overall
    assert set(load_history(tmp_path / "all.csv", cut="medium")["cut"]) == {"medium"}


def test_load_history_errors(tmp_path: Path):
    missing = tmp_path / "nope" / "history.csv"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_history(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_history(tmp_path / "empty")
    bad = tmp_path / "bad" / "history.csv"
    save_history(BASE.drop(columns=["uplink_bytes", "test_accuracy"]), bad)
    with pytest.raises(ValueError, match="test_accuracy, uplink_bytes"):
        load_history(bad)


def _histories() -> pd.DataFrame:
    parts = [
        BASE.assign(policy="none", cut="medium"),
        QU.assign(policy="qu", cut="medium"),
        SP.assign(policy="sp", cut="medium"),
        MS.assign(policy="ms", cut="medium"),
        MS.assign(policy="ms", cut="deep"),  # a cut without baseline
    ]
    return pd.concat(parts, ignore_index=True)


def test_summary_table_hand_values():
    table = summary_table(_histories())
    medium = table[table["cut"] == "medium"].set_index("policy")
    assert list(medium.index) == ["none", "qu", "sp", "ms"]
    assert medium.loc["none", "final_accuracy"] == pytest.approx(0.55)
    assert medium.loc["none", "best_accuracy"] == pytest.approx(0.6)
    assert medium.loc["ms", "total_uplink_bytes"] == 300
    assert medium.loc["ms", "total_bytes"] == 300 + 2000
    assert medium.loc["ms", "bytes_saved_pct"] == pytest.approx(92.5)
    assert medium.loc["sp", "bytes_saved_pct"] == pytest.approx(96.0)
    assert medium.loc["none", "bytes_saved_pct"] == pytest.approx(0.0)
    assert medium.loc["ms", "target_accuracy"] == pytest.approx(0.55)
    assert medium.loc["ms", "traffic_to_target"] == 225
    assert medium.loc["ms", "traffic_saving_multiplier"] == pytest.approx(3000 / 225)
    assert medium.loc["qu", "traffic_saving_multiplier"] == pytest.approx(7.5)
    assert medium.loc["sp", "traffic_saving_multiplier"] == math.inf
    assert not medium.loc["sp", "reaches_baseline"]
    assert medium.loc["ms", "reaches_baseline"]
    assert medium.loc["none", "traffic_saving_multiplier"] == pytest.approx(1.0)
    assert medium.loc["none", "uplink_seconds"] == pytest.approx(4000 * 8 / 1e8)
    deep = table[table["cut"] == "deep"].iloc[0]
    assert deep["policy"] == "ms" and math.isnan(deep["traffic_saving_multiplier"])


def test_summary_table_rejects_duplicate_runs():
    df = pd.concat(
        [BASE.assign(policy="none", run="a"), BASE.assign(policy="none", run="b")],
        ignore_index=True,
    )
    with pytest.raises(ValueError, match="several runs"):
        summary_table(df)


def test_multiplier_table_layout():
    table = multiplier_table(summary_table(_histories()))
    assert list(table.index) == ["medium", "deep"]
    assert list(table.columns) == ["qu", "sp", "ms"]
    assert table.loc["medium", "ms"] == "13.33×"
    assert table.loc["medium", "sp"] == "INF"
    assert table.loc["medium", "qu"] == "7.50×"
    assert table.loc["deep", "ms"] == ""


def test_load_then_summarise(tmp_path: Path):
    for name, df in {"none": BASE, "ms": MS}.items():
        _write(df, tmp_path / "medium" / name / "history.csv")
    table = summary_table(load_history(tmp_path)).set_index("policy")
    assert table.loc["ms", "traffic_saving_multiplier"] == pytest.approx(3000 / 225)


def test_total_bytes_column_is_filled_where_missing(tmp_path: Path):
    assert "total_bytes" in HISTORY_COLUMNS
    partial = MS.assign(total_bytes=[575.0, math.nan, 9.0, math.nan])  # an engine wrote two
    assert list(with_total_bytes(partial)["total_bytes"]) == [575, 575, 9, 575]
    assert list(with_total_bytes(MS)["total_bytes"]) == [575] * 4
    assert "total_bytes" not in MS.columns  # the input is not modified
    path = _write(MS, tmp_path / "ms" / "history.csv")  # an old csv without the column
    assert list(load_history(path)["total_bytes"]) == [575] * 4


def test_traffic_keyword_short_names():
    # baseline reaches 0.55 in round 3: uplink 3000, downlink 1500, total 4500
    assert traffic_to_accuracy(BASE, 0.55, traffic="uplink") == 3000
    assert traffic_to_accuracy(BASE, 0.55, traffic="downlink") == 1500
    assert traffic_to_accuracy(BASE, 0.55, traffic="total") == 4500
    assert traffic_to_accuracy(BASE, 0.55) == traffic_to_accuracy(BASE, 0.55, traffic="uplink")
    # a total_bytes column an engine wrote is used as is
    odd = BASE.assign(total_bytes=[1.0, 2.0, 3.0, 4.0])
    assert traffic_to_accuracy(odd, 0.55, traffic="total") == 6
    # downlink only: MS sends 500 B of gradients per round like the baseline: 1500 / 1500
    assert traffic_saving_multiplier(BASE, MS, traffic="downlink") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="uplink, downlink, total"):
        traffic_to_accuracy(BASE, 0.5, traffic="sideways")


def test_summary_and_multiplier_tables_on_total_traffic():
    table = summary_table(_histories(), traffic="total").set_index("policy")
    medium = table[table["cut"] == "medium"]
    # baseline 4500 B to 0.55; MS (75 + 500) * 3 = 1725; QU (100 + 500) * 4 = 2400
    assert medium.loc["ms", "traffic_to_target"] == 1725
    assert medium.loc["ms", "traffic_saving_multiplier"] == pytest.approx(4500 / 1725)
    assert medium.loc["qu", "traffic_saving_multiplier"] == pytest.approx(4500 / 2400)
    assert multiplier_table(summary_table(_histories(), traffic="total")).loc["medium", "ms"] == (
        "2.61×"
    )
