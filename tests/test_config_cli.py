"""``python -m flwr_splitms.config``: OK plus the settings, or every problem and exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flwr_splitms.config import SplitConfig
from flwr_splitms.config.__main__ import TRAIN_CLASS_COUNTS, main, partition_sizes
from flwr_splitms.config.overrides import parse_pairs

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "cifar100_resnet18"


def test_module_runs_as_a_command() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "flwr_splitms.config", "steps-per-rnd=2 codec-ratio=1.5"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "steps-per-rnd=2: unknown key; did you mean steps-per-round?",
        "codec-ratio=1.5: 'ms' takes a number in (0, 1); its default: codec-ratio=0.99",
    ]
    assert "Traceback" not in bad.stderr
    good = subprocess.run(
        [sys.executable, "-m", "flwr_splitms.config", "--help"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    assert "Invalid run configuration" in good.stdout  # says why to use it


def test_ok_prints_the_effective_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['codec="qu"', "batch-size=32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "OK"
    assert 'codec = "qu"' in lines and "batch-size = 32" in lines
    assert "codec-bits = 3  # the codec's default" in lines


def test_app_defaults_and_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--app", str(APP), "--file", str(ROOT / "strategies" / "sp.toml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "num-server-rounds = 100" in out and "codec-ratio = 0.95875" in out


def test_several_arguments_and_all_problems(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch-size=0", 'cut="deeep"', "codec=ms", "oops"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "codec=ms: not a TOML value; strings need double quotes, and the whole list single "
        "quotes in the shell: --run-config 'codec=\"ms\"'",
        "'oops': not a key=value pair (e.g. batch-size=32)",
        "batch-size=0: must be an integer >= 1; closest valid: batch-size=1",
        'cut="deeep": not a cut of resnet18; allowed: shallow, medium, deep or a stage index '
        '1..9; did you mean cut="deep"?',
    ]


def test_parse_pairs_matches_flower() -> None:
    from flwr.common.config import parse_config_args

    text = "codec=\"ms\" codec-ratio=0.9 augment=false cut='deep' seed=3"
    values, problems = parse_pairs([text])
    assert problems == [] and values == parse_config_args([text])
    assert parse_pairs(["codec=ms"], bare_strings=True) == ({"codec": "ms"}, [])


def test_a_device_missing_on_this_machine_is_a_problem(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from flwr_splitms import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert main(['device="cuda"']) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('device="cuda": ') and "available: cpu" in line
    assert "THIS machine" in line and "--no-device-check" in line
    assert main(['device="cuda"', "--no-device-check"]) == 0  # checking for another machine
    assert main(['device="auto"']) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith('# device="auto" is cpu on this machine') for line in out)


def test_batch_larger_than_the_smallest_partition_is_a_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    synthetic = ['dataset="synthetic"', "synthetic-size=64"]
    assert main([*synthetic, "batch-size=40"]) == 1  # 2 nodes (min-nodes): 32 examples each
    assert capsys.readouterr().err.splitlines() == [
        "batch-size=40: larger than the training data of client partition 0 (32 examples of "
        "2 partitions); closest valid: batch-size=32 (or use fewer clients)"
    ]
    assert main([*synthetic, "batch-size=20", "--nodes", "4"]) == 1  # 16 each
    assert "closest valid: batch-size=16" in capsys.readouterr().err
    assert main([*synthetic, "batch-size=16", "--nodes", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        "# batch-size 16 fits every client: the smallest of 4 iid partitions of synthetic "
        "holds 16 training examples"
    ) in out
    assert main(["batch-size=64", "--nodes", "1000"]) == 1  # CIFAR-100: 50 per partition
    assert "batch-size=64: larger than" in capsys.readouterr().err
    assert main([*synthetic, "--nodes", "65"]) == 1
    assert "--nodes 65: num_partitions=65 exceeds the 64 samples" in capsys.readouterr().err


def test_nodes_below_min_nodes_say_how_the_run_stops(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "1"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("--nodes 1: fewer than min-nodes=2; the run waits node-wait=60s")
    assert '"num-supernodes=2"' in line and "min-nodes=1" in line
    assert main(["--nodes", "1", "min-nodes=1"]) == 0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_sizes_are_the_runs(tiny_config: SplitConfig, scheme: str) -> None:
    """The sizes computed from class counts alone equal those of the partitions the run cuts."""
    from flwr_splitms import experiment

    config = tiny_config.replace(partition=scheme, dirichlet_alpha=0.3, synthetic_size=97)
    for nodes in (1, 3, 7):
        assert partition_sizes(config, nodes) == experiment.partition_sizes(config, nodes)


def test_known_training_splits() -> None:
    assert sum(TRAIN_CLASS_COUNTS["cifar10"]) == sum(TRAIN_CLASS_COUNTS["cifar100"]) == 50_000
    assert sum(TRAIN_CLASS_COUNTS["mnist"]) == sum(TRAIN_CLASS_COUNTS["fashion-mnist"]) == 60_000
    assert partition_sizes(SplitConfig(dataset="imagenet"), 2) is None  # sized once loaded


def test_last_line_says_what_was_not_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(['dataset="synthetic"']) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("# not checked: the devices and memory of the SuperLink's")
    assert "assumed: min-nodes=2; give --nodes N" in last
    assert main(['dataset="imagenet"', "data-download=false", "--nodes", "3"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "that imagenet is in data-root ~/.cache/flwr-splitms/data;" in last
    assert "batch-size against the partitions of imagenet" in last
    assert last.endswith("how many SuperNodes connect")


def test_the_rate_at_the_runs_batch_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["batch-size=16"]) == 0
    assert (
        '# lr 0.1 is the rate at batch 64: 0.05 at batch-size 16 (lr-scaling="sqrt"), '
        "reached after a 10-step warmup"
    ) in capsys.readouterr().out.splitlines()
    assert main(["batch-size=16", 'lr-scaling="linear"', "warmup-steps=0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert '# lr 0.1 is the rate at batch 64: 0.025 at batch-size 16 (lr-scaling="linear")' in out
    assert main(['lr-scaling="none"', "lr=0.05", "warmup-steps=0"]) == 0
    assert '# lr 0.05 as given (lr-scaling="none")' in capsys.readouterr().out.splitlines()
