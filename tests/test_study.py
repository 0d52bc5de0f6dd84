"""The study runner: grid and resume, summary numbers on hand-made histories, CLI, error study.

Runs train a ResNet18 on 64 synthetic images for 2 rounds of 2 steps (a few seconds each).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from flwr_splitms.study import (
    ErrorStudySpec,
    StudySpec,
    compare_to_baselines,
    parse_overrides,
    parse_value,
    run_error_study,
    run_study,
    seed_summary,
    summary_markdown,
)
from flwr_splitms.study.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "strategies"
TINY = {
    "dataset": "synthetic",
    "data-download": False,
    "num-classes": 4,
    "synthetic-size": 64,
    "arch": "resnet18",
    "num-server-rounds": 2,
    "steps-per-round": 2,
    "batch-size": 8,
    "eval-max-examples": 8,
    "augment": False,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(overrides: dict | None = None, **study: object) -> StudySpec:
    data = {
        "study": {
            "policies": ["none", "ms"],
            "cuts": ["deep"],
            "seeds": [0],
            "num-clients": 1,
            "presets": str(PRESETS),
            **study,
        },
        "run-config": TINY,
    }
    return StudySpec.from_dict(data, overrides, default_name="tiny")


# --- spec and --set parsing ---------------------------------------------------------------


def test_parse_value_and_overrides():
    assert parse_value("0.05") == 0.05 and parse_value("3") == 3
    assert parse_value("true") is True and parse_value("[0, 1]") == [0, 1]
    assert parse_value("mnist") == "mnist" and parse_value('"x y"') == "x y"
    assert parse_value("/data/cifar") == "/data/cifar"
    assert parse_overrides(["lr=0.05", "dataset=mnist", "study.seeds=[1, 2]"]) == {
        "lr": 0.05,
        "dataset": "mnist",
        "study.seeds": [1, 2],
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["=3"])


def test_spec_merges_presets_cut_seed_and_overrides():
    spec = StudySpec.from_dict(
        {
            "study": {"policies": ["none", "ms", "qu"], "cuts": ["deep", "shallow"], "seeds": [3]},
            "run-config": {**TINY, "lr": 0.2},
        },
        {"lr": 0.01, "codec-bits": 4, "study.seeds": [5, 6]},
    )
    runs = spec.runs()
    assert len(runs) == 3 * 2 * 2
    assert [r.name for r in runs[:3]] == ["none-deep-s5", "ms-deep-s5", "qu-deep-s5"]
    ms = runs[1].config()
    assert (ms.codec, ms.codec_ratio, ms.cut, ms.seed, ms.lr) == ("ms", 0.99, "deep", 5, 0.01)
    assert ms.codec_bits == 4  # --set wins over the preset: it applies to every run
    assert runs[2].config().codec == "qu" and runs[2].config().codec_bits == 4


@pytest.mark.parametrize(
    ("study", "overrides", "match"),
    [
        ({"policies": ["ms"]}, {}, "baseline policy 'none'"),
        ({"policies": ["none", "nope"]}, {}, "unknown policy 'nope'.*presets: .*ms"),
        ({"seeds": []}, {}, "no seeds"),
        ({"cuts": ["deep", "deep"]}, {}, "duplicate cuts"),
        ({"colour": 1}, {}, "unknown \\[study\\] key"),
        ({}, {"seed": 3}, "set by the grid"),
        ({}, {"lr-rate": 0.1}, "lr-rate"),
        ({"cuts": ["middle"]}, {}, "middle"),
    ],
)
def test_spec_errors_name_the_problem(study, overrides, match):
    data = {"study": {"presets": str(PRESETS), **study}, "run-config": TINY}
    with pytest.raises(ValueError, match=match):
        StudySpec.from_dict(data, overrides)


def test_shipped_study_files_parse():
    for name in ("default", "paper"):
        spec = StudySpec.from_toml(ROOT / "studies" / f"{name}.toml")
        assert spec.policies == ("none", "qu", "sp", "rt", "ms") and len(spec.seeds) == 3
    paper = StudySpec.from_toml(ROOT / "studies" / "paper.toml").runs()[0].config()
    assert (paper.arch, paper.dataset, paper.num_server_rounds) == ("resnet18", "cifar100", 100)
    errors = ErrorStudySpec.from_toml(ROOT / "studies" / "errors.toml")
    assert errors.cuts == ("shallow", "medium", "deep")


# --- the runner ---------------------------------------------------------------------------


def test_run_study_resumes_only_missing_runs(tmp_path: Path):
    spec = tiny_spec()
    first = run_study(spec, tmp_path, figures=False)
    assert first.ran == ["none-deep-s0", "ms-deep-s0"] and first.skipped == []
    for name in first.ran:
        folder = tmp_path / "runs" / name
        sidecar = json.loads((folder / "run.json").read_text())
        assert sidecar["finished"] and sidecar["run-config"]["cut"] == "deep"
        history = pd.read_csv(folder / "history.csv")
        assert list(history["round"]) == [1, 2]
        assert (history["total_bytes"] == history["uplink_bytes"] + history["downlink_bytes"]).all()
    ms_path = tmp_path / "runs" / "ms-deep-s0" / "history.csv"
    ms_history = ms_path.read_bytes()

    # a run killed before its marker: history without run.json counts as not finished
    (tmp_path / "runs" / "none-deep-s0" / "run.json").unlink()
    second = run_study(spec, tmp_path, figures=False)
    assert second.ran == ["none-deep-s0"] and second.skipped == ["ms-deep-s0"]
    assert ms_path.read_bytes() == ms_history  # not rewritten

    # a deleted run folder runs again (same numbers: seeded); the others are kept
    shutil.rmtree(tmp_path / "runs" / "ms-deep-s0")
    third = run_study(spec, tmp_path, figures=False)
    assert third.ran == ["ms-deep-s0"] and third.skipped == ["none-deep-s0"]
    columns = ["round", "train_loss", "test_accuracy", "uplink_bytes", "total_bytes"]
    pd.testing.assert_frame_equal(
        pd.read_csv(ms_path)[columns], pd.read_csv(io.BytesIO(ms_history))[columns]
    )

    # changed settings: everything runs again
    changed = tiny_spec({"eval-max-examples": 4})
    assert len(run_study(changed, tmp_path, figures=False).ran) == 2

    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["policy"]) == ["none", "ms"]
    assert "| deep | ms |" in (tmp_path / "summary.md").read_text()


def test_run_study_writes_figures_with_stub_engine(tmp_path: Path):
    """The summary and figures from a fake engine: hand-made histories per seed."""

    def fake(grid_run, num_clients, folder):
        accuracy = {"none": [0.2, 0.5], "ms": [0.3, 0.6]}[grid_run.policy]
        uplink = {"none": 1000.0, "ms": 100.0}[grid_run.policy]
        return pd.DataFrame(
            {
                "round": [1, 2],
                "train_loss": [2.0, 1.0],
                "test_accuracy": [a + 0.01 * grid_run.seed for a in accuracy],
                "uplink_bytes": [uplink, uplink],
                "uplink_raw_bytes": [1000.0, 1000.0],
                "downlink_bytes": [1000.0, 1000.0],
                "compression_error": [0.0 if grid_run.policy == "none" else 0.3] * 2,
            }
        )

    result = run_study(tiny_spec(seeds=[0, 1]), tmp_path, run_fn=fake)
    for name in ("accuracy_vs_rounds", "accuracy_vs_traffic"):
        assert result.files[name].read_bytes()[:4] == b"\x89PNG"
    ms = result.summary.set_index("policy").loc["ms"]
    # baseline final accuracy 0.5 (+0.01 for seed 1) first reached by MS in round 2: 200 B
    assert ms["uplink_multiplier_mean"] == pytest.approx(2000 / 200)
    assert ms["total_multiplier_mean"] == pytest.approx(4000 / 2200)
    assert ms["best_accuracy_mean"] == pytest.approx(0.605)


# --- summary numbers on hand-made histories -----------------------------------------------


def history(acc: list[float], uplink: float, downlink: float = 500.0) -> pd.DataFrame:
    n = len(acc)
    return pd.DataFrame(
        {
            "round": list(range(1, n + 1)),
            "test_accuracy": acc,
            "uplink_bytes": [uplink] * n,
            "uplink_raw_bytes": [1000.0] * n,
            "downlink_bytes": [downlink] * n,
            "compression_error": [0.1] * n,
        }
    )


def hand_histories() -> pd.DataFrame:
    runs = {
        # seed 0: baseline final 0.55, reached in round 3 (3000 B up, 4500 B total)
        ("none", 0): history([0.2, 0.5, 0.6, 0.55], 1000),
        ("ms", 0): history([0.1, 0.3, 0.56, 0.7], 75),  # round 3: 225 B -> 13.33x
        ("sp", 0): history([0.1, 0.2, 0.3, 0.4], 40),  # never: INF
        # seed 1: baseline final 0.5, reached in round 2 (2000 B up, 3000 B total)
        ("none", 1): history([0.3, 0.5, 0.45, 0.5], 1000),
        ("ms", 1): history([0.3, 0.5, 0.6, 0.6], 75),  # round 2: 150 B -> 13.33x
        ("sp", 1): history([0.1, 0.2, 0.3, 0.5], 40),  # round 4: 160 B -> 12.5x
    }
    return pd.concat(
        [df.assign(policy=p, cut="medium", seed=s) for (p, s), df in runs.items()],
        ignore_index=True,
    )


def test_seed_summary_hand_values():
    summary = seed_summary(hand_histories()).set_index("policy")
    ms, sp, none = summary.loc["ms"], summary.loc["sp"], summary.loc["none"]
    assert ms["seeds"] == 2 and ms["reached"] == 2 and sp["reached"] == 1
    assert ms["best_accuracy_mean"] == pytest.approx(0.65)
    assert ms["best_accuracy_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # ddof=1
    assert none["target_accuracy_mean"] == pytest.approx(0.525)
    assert ms["uplink_multiplier_mean"] == pytest.approx(3000 / 225)
    assert ms["uplink_multiplier_std"] == pytest.approx(0.0)
    assert ms["uplink_to_target_mean"] == pytest.approx((225 + 150) / 2)
    # total: seed 0 4500 / (575 * 3), seed 1 3000 / (575 * 2)
    assert ms["total_multiplier_mean"] == pytest.approx((4500 / 1725 + 3000 / 1150) / 2)
    assert sp["uplink_multiplier_mean"] == pytest.approx(12.5)  # the seed that reached
    assert math.isnan(sp["uplink_multiplier_std"])  # one seed: no spread
    assert ms["uplink_saving"] == pytest.approx(1000 / 75)
    assert ms["total_saving"] == pytest.approx(1500 / 575)
    assert ms["uplink_bytes_mean"] == 300 and ms["total_bytes_mean"] == 2300
    assert none["uplink_multiplier_mean"] == pytest.approx(1.0)


def test_seed_summary_inf_when_no_seed_reaches():
    df = hand_histories()
    df = df[~((df["policy"] == "sp") & (df["seed"] == 1))]
    sp = seed_summary(df).set_index("policy").loc["sp"]
    assert sp["reached"] == 0 and sp["seeds"] == 1
    assert sp["uplink_multiplier_mean"] == math.inf and sp["uplink_to_target_mean"] == math.inf


def test_summary_markdown_marks_inf_and_partial_seeds():
    text = summary_markdown(seed_summary(hand_histories()), "hand")
    ms_row = next(line for line in text.splitlines() if line.startswith("| medium | ms |"))
    sp_row = next(line for line in text.splitlines() if line.startswith("| medium | sp |"))
    assert "13.33× ± 0.00" in ms_row and "2/2" in ms_row
    assert "12.50× (1/2 seeds; INF in the others)" in sp_row
    assert "0.650 ± 0.071" in ms_row  # best accuracy mean ± std


# --- CLI ----------------------------------------------------------------------------------


def test_cli_help_and_set_parsing(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_help:
        build_parser().parse_args(["--help"])
    assert exit_help.value.code == 0
    assert "--set KEY=VALUE" in capsys.readouterr().out
    args = build_parser().parse_args(["errors", "--set", "lr=0.1", "--set", "dataset=mnist"])
    assert args.study == "errors" and args.overrides == ["lr=0.1", "dataset=mnist"]
    with pytest.raises(SystemExit):
        main(["--set", "novalue"])
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "study file not found" in capsys.readouterr().err


def test_cli_help_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "flwr_splitms.study", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "errors" in done.stdout and "--engine" in done.stdout


def test_cli_runs_a_study_file(tmp_path: Path, capsys):
    study = tmp_path / "s.toml"
    lines = ["[study]", 'policies = ["none", "qu"]', 'cuts = ["deep"]', "seeds = [0]"]
    lines += ["num-clients = 1", f'presets = "{PRESETS}"', "[run-config]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in TINY.items()]
    study.write_text("\n".join(lines).replace("false", "false") + "\n")
    code = main(
        ["--config", str(study), "--out", str(tmp_path / "o"), "--set", "num-server-rounds=1"]
    )
    assert code == 0, capsys.readouterr().err
    runs = sorted(p.name for p in (tmp_path / "o" / "runs").iterdir())
    assert runs == ["none-deep-s0", "qu-deep-s0"]
    assert len(pd.read_csv(tmp_path / "o" / "runs" / "qu-deep-s0" / "history.csv")) == 1
    assert (tmp_path / "o" / "accuracy_vs_traffic.png").is_file()


# --- error study --------------------------------------------------------------------------


def test_compare_to_baselines_interpolates_at_ms_bits():
    errors = pd.DataFrame(
        [
            ("deep", "qu", "bits=2", 2.0, 0.4),
            ("deep", "qu", "bits=4", 4.0, 0.2),
            ("deep", "sp", "ratio=0.9", 4.2, 0.5),
            ("deep", "ms", "ratio=0.99,bits=2", 3.0, 0.25),  # QU at 3.0: 0.3 -> below
            ("deep", "ms", "ratio=0.99,bits=3", 3.5, 0.26),  # QU at 3.5: 0.25 -> above
            ("deep", "ms", "ratio=0.99,bits=8", 8.3, 0.01),  # past QU's range
        ],
        columns=["cut", "codec", "setting", "bits_per_element", "relative_error"],
    )
    table = compare_to_baselines(errors)
    qu = table[table["baseline"] == "qu"].set_index("setting")
    assert qu.loc["ratio=0.99,bits=2", "baseline_error"] == pytest.approx(0.3)
    assert qu.loc["ratio=0.99,bits=2", "verdict"] == "below"
    assert qu.loc["ratio=0.99,bits=3", "difference"] == pytest.approx(0.01)
    assert qu.loc["ratio=0.99,bits=3", "verdict"] == "above"
    assert qu.loc["ratio=0.99,bits=8", "verdict"] == "out of range"
    assert set(table[table["baseline"] == "sp"]["verdict"]) == {"out of range"}  # one point
    assert "rt" not in set(table["baseline"])


def test_error_study_trains_measures_and_reloads(tmp_path: Path):
    spec = ErrorStudySpec(
        run_config={**TINY, "num-server-rounds": 1},
        cuts=("shallow", "deep"),
        batches=1,
        batch_size=4,
        qu_bits=(2, 4),
        sp_ratios=(0.99, 0.9),
        rt_ratios=(0.9,),
        ms_ratios=(0.99,),
        ms_bits=(2,),
    )
    result = run_error_study(spec, tmp_path)
    errors = pd.read_csv(tmp_path / "errors.csv")
    assert len(errors) == 2 * (2 + 2 + 1 + 1)
    assert set(errors["cut"]) == {"shallow", "deep"}
    ms = errors[errors["codec"] == "ms"].iloc[0]
    # 2-bit mask over every element + 1% kept float32 values (a few elements of slack)
    assert 2.0 < ms["bits_per_element"] < 2.0 + 32 * 0.011
    qu4 = errors[(errors["codec"] == "qu") & (errors["bits"] == 4)]
    assert qu4["bits_per_element"].between(3.99, 4.2).all()
    assert ((errors["relative_error"] > 0) & (errors["relative_error"] < 1.5)).all()
    assert (tmp_path / "errors.png").read_bytes()[:4] == b"\x89PNG"
    assert len(result.comparison) == 2 * 3  # one MS point x three baselines x two cuts
    assert (tmp_path / "model.pt").is_file() and result.train_history is not None

    # the checkpoint gives the same activations, hence the same errors, without training
    again = ErrorStudySpec.from_toml(
        _errors_file(tmp_path, spec), {"errors.checkpoint": str(tmp_path / "model.pt")}
    )
    reloaded = run_error_study(again, tmp_path / "again", figures=False)
    assert reloaded.train_history is None
    pd.testing.assert_frame_equal(reloaded.errors, result.errors)


def _errors_file(tmp_path: Path, spec: ErrorStudySpec) -> Path:
    lines = ["[errors]", 'cuts = ["shallow", "deep"]', "batches = 1", "batch-size = 4"]
    lines += ["qu-bits = [2, 4]", "sp-ratios = [0.99, 0.9]", "rt-ratios = [0.9]"]
    lines += ["ms-ratios = [0.99]", "ms-bits = [2]", "[run-config]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in spec.run_config.items()]
    path = tmp_path / "errors.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_error_study_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(ValueError, match=r"bad ms setting ratio=0\.99,bits=9"):
        ErrorStudySpec(run_config=TINY, ms_bits=(9,))
    spec = ErrorStudySpec(run_config=TINY, checkpoint=tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match=r"drop errors\.checkpoint"):
        run_error_study(spec, tmp_path)
    with pytest.raises(ValueError, match="unknown \\[errors\\] key 'colour'"):
        ErrorStudySpec.from_toml(_errors_file(tmp_path, spec), {"errors.colour": 1})


# --- the flwr engine, against a stand-in for the flwr command -----------------------------

FAKE_FLWR = """#!{python}
import json, sys
from pathlib import Path
from flwr.common.config import parse_config_args  # Flower's own --run-config parser

args = sys.argv[1:]
assert args[0] == "run" and "--stream" in args, args
config = parse_config_args([args[args.index("--run-config") + 1]])
clients = int(args[args.index("--federation-config") + 1].removeprefix("num-supernodes="))
if config["codec"] == "qu":
    sys.exit("qu fails here")
out = Path(config["output-dir"])
out.mkdir(parents=True)
rounds = range(1, config["num-server-rounds"] + 1)
rows = ["round,test_accuracy,uplink_bytes,downlink_bytes,compression_error"]
rows += [f"{{r}},{{0.1 * r}},{{clients * 10}},{{clients * 20}},0.0" for r in rounds]
(out / "history.csv").write_text("\\n".join(rows) + "\\n")
print(json.dumps(config))
"""


def test_flwr_engine_builds_the_command(tmp_path: Path):
    from flwr_splitms.study import run_flwr

    fake = tmp_path / "flwr"
    fake.write_text(FAKE_FLWR.format(python=sys.executable))
    fake.chmod(0o755)
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("")
    run_fn = run_flwr(app, flwr=str(fake))
    spec = tiny_spec(
        {"data-root": "/data with space/x", "lr": 5e-4}, seeds=[0], **{"num-clients": 3}
    )
    result = run_study(spec, tmp_path / "o", engine="flwr", run_fn=run_fn, figures=False)
    assert result.ran == ["none-deep-s0", "ms-deep-s0"]
    log = (tmp_path / "o" / "runs" / "ms-deep-s0" / "flwr.log").read_text()
    config = json.loads(log.splitlines()[0])
    assert (config["codec"], config["cut"], config["seed"], config["lr"]) == ("ms", "deep", 0, 5e-4)
    assert config["data-root"] == "/data with space/x" and config["augment"] is False
    history = pd.read_csv(tmp_path / "o" / "runs" / "ms-deep-s0" / "history.csv")
    assert list(history["uplink_bytes"]) == [30, 30] and list(history["total_bytes"]) == [90, 90]
    sidecar = json.loads((tmp_path / "o" / "runs" / "ms-deep-s0" / "run.json").read_text())
    assert sidecar["engine"] == "flwr" and sidecar["num-clients"] == 3

    failing = tiny_spec(policies=["none", "qu"])
    with pytest.raises(RuntimeError, match=r"flwr run failed .*flwr\.log"):
        run_study(failing, tmp_path / "f", engine="flwr", run_fn=run_fn, figures=False)
    with pytest.raises(FileNotFoundError, match="no Flower app"):
        run_flwr(tmp_path / "nowhere")


def test_a_run_with_dropped_clients_is_marked():
    histories = hand_histories()
    histories["dropped_clients"] = 0
    histories.loc[(histories["policy"] == "sp") & (histories["seed"] == 1), "dropped_clients"] = 2
    summary = seed_summary(histories).set_index("policy")
    assert summary.loc["sp", "dropped_clients"] == 8 and summary.loc["ms", "dropped_clients"] == 0
    text = summary_markdown(seed_summary(histories), "hand")
    assert "| medium | sp (drops: 8 clients) |" in text
    assert "| medium | ms |" in text
