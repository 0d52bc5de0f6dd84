"""``python -m flwr_splitms.config``: OK plus the settings, or every problem and exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flwr_splitms.config.__main__ import main
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
