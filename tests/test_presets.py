"""Presets in strategies/: they parse, build their codec, save what they claim, and run."""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from flwr_splitms.config import SplitConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "strategies"
EXAMPLE_PYPROJECT = ROOT / "examples" / "cifar100_resnet18" / "pyproject.toml"

# Fraction of the uplink bytes each codec preset saves (data sections, no header):
# bits per element / 32 for float32 activations.
CODEC_PRESETS: dict[str, tuple[str, float]] = {
    "none.toml": ("none", 0.0),
    "ms.toml": ("ms", 1 - (2 + 32 * 0.01) / 32),  # 92.75%
    "sp.toml": ("sp", 1 - (1 + 32 * 0.04125) / 32),  # 92.75%, matched to MS as in the paper
    "rt.toml": ("rt", 1 - (1 + 32 * 0.04125) / 32),
    "qu.toml": ("qu", 1 - 3 / 32),  # 90.625%
    # ratio 0.99: 32-bit indices (0.01 * 64 bits) beat the bitmap (1.32 bits), App. B: 98%
    "sp99.toml": ("sp", 1 - 0.01 * (32 + 32) / 32),
    "rt99.toml": ("rt", 1 - 0.01 * (32 + 32) / 32),
}
CUT_PRESETS: dict[str, str] = {
    "shallow.toml": "shallow",
    "medium.toml": "medium",
    "deep.toml": "deep",
}
# Policies that choose the codec themselves (tests/test_budget.py checks budget.toml's number).
POLICY_PRESETS: dict[str, str] = {"budget.toml": "budget"}
ALL = sorted([*CODEC_PRESETS, *CUT_PRESETS, *POLICY_PRESETS])

# A run small enough for one step per preset in well under a second or two on a CPU.
TINY: dict[str, Any] = {
    "dataset": "synthetic",
    "num-classes": 10,
    "synthetic-size": 64,
    "data-download": False,
    "arch": "resnet18",
    "batch-size": 4,
    "eval-batch-size": 8,
    "eval-max-examples": 8,
    "steps-per-round": 1,
    "num-server-rounds": 1,
    "lr-schedule": "constant",
}


def load(name: str) -> dict[str, Any]:
    with (PRESETS / name).open("rb") as handle:
        return tomllib.load(handle)


def test_every_preset_is_known():
    assert sorted(p.name for p in PRESETS.glob("*.toml")) == ALL


@pytest.mark.parametrize("name", ALL)
def test_preset_parses_into_split_config(name: str):
    preset = load(name)
    assert preset, f"{name} is empty"
    assert all(not isinstance(v, dict) for v in preset.values()), f"{name} must be flat"
    unknown = set(preset) - set(SplitConfig.keys())
    assert not unknown, f"{name}: keys not in SplitConfig: {unknown}"
    config = SplitConfig.from_run_config(preset)
    if name in CODEC_PRESETS:
        assert config.codec == CODEC_PRESETS[name][0]
    elif name in POLICY_PRESETS:
        assert config.codec == POLICY_PRESETS[name]
    else:
        assert set(preset) == {"cut"} and config.cut == CUT_PRESETS[name]


@pytest.mark.parametrize("name", sorted(CODEC_PRESETS))
def test_codec_preset_saves_what_it_claims(name: str):
    from flwr_splitms.codecs import compression_error, get_codec

    config = SplitConfig.from_run_config(load(name))
    codec = get_codec(config.codec, **config.codec_params)
    x = torch.relu(torch.randn(4, 64, 16, 16, generator=torch.Generator().manual_seed(0)))
    raw = x.numel() * x.element_size()
    payload = codec.encode(x, generator=torch.Generator().manual_seed(1), train=True)
    expected = CODEC_PRESETS[name][1]
    assert 1 - payload.nbytes / raw == pytest.approx(expected, abs=2e-4)
    # the whole message (header included) is within 0.2% of the data bytes
    assert 1 - len(payload.to_bytes()) / raw == pytest.approx(expected, abs=2e-3)
    x_hat = codec.decode(payload)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    error = compression_error(x, x_hat)
    assert math.isfinite(error)
    assert error == 0.0 if config.codec == "none" else 0.0 < error < 1.0


def test_readme_states_each_codec_saving():
    text = (PRESETS / "README.md").read_text(encoding="utf-8")
    for name, (_, saved) in CODEC_PRESETS.items():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
        assert len(rows) == 1, f"README table lacks a row for {name}"
        assert rows[0].rstrip(" |").endswith(f"{saved * 100:g}%"), rows[0]


def test_example_app_declares_every_preset_key():
    if not EXAMPLE_PYPROJECT.is_file():
        pytest.skip("examples/cifar100_resnet18 not present")
    with EXAMPLE_PYPROJECT.open("rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    for name in ALL:
        missing = set(load(name)) - set(app_config)
        assert not missing, f"{name}: keys the example app does not declare: {missing}"


def test_merge_presets_feeds_flwr_run_config():
    from flwr.common.config import parse_config_args

    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "merge_presets.py"),
            str(PRESETS / "ms.toml"),
            str(PRESETS / "deep.toml"),
            "num-server-rounds=7",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    expected = {**load("ms.toml"), "cut": "deep", "num-server-rounds": 7}
    assert parse_config_args([out]) == expected
    # Why the script exists: flwr refuses a second TOML file (README, "Combining presets").
    with pytest.raises(ValueError, match="TOML"):
        parse_config_args([str(PRESETS / "sp.toml"), str(PRESETS / "deep.toml")])


def run_merge(*items: str) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "scripts" / "merge_presets.py")
    return subprocess.run(
        [sys.executable, script, *items], capture_output=True, text=True, check=False
    )


def test_merge_presets_accepts_unquoted_strings_and_explains_bad_values(tmp_path: Path):
    from flwr.common.config import parse_config_args

    out = run_merge(str(PRESETS / "qu.toml"), "codec=sp cut=deep", 'seed=3 lr-schedule="step"')
    assert out.returncode == 0, out.stderr
    merged = parse_config_args([out.stdout.strip()])
    assert merged == {
        "codec": "sp",
        "codec-bits": 3,
        "cut": "deep",
        "seed": 3,
        "lr-schedule": "step",
    }
    bad = run_merge("seed=1.2.3", 'codec="ms')
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "seed=1.2.3: not a TOML value" in bad.stderr
    assert """--run-config 'seed="1.2.3"'""" in bad.stderr
    missing = run_merge(str(PRESETS / "no-such-preset.toml"))
    assert missing.returncode == 1 and "cannot read the preset" in missing.stderr
    assert "Traceback" not in missing.stderr
    malformed = tmp_path / "bad.toml"
    malformed.write_text("codec = ms\n")
    broken = run_merge(str(malformed))
    assert broken.returncode == 1 and "bad.toml: not valid TOML" in broken.stderr
    assert "Traceback" not in broken.stderr


# The engines run codec="budget" once issue 20 wires core/budget.py into them: then use ALL.
@pytest.mark.parametrize("name", sorted([*CODEC_PRESETS, *CUT_PRESETS]))
def test_preset_runs_one_step(name: str):
    local = pytest.importorskip("flwr_splitms.local")
    config = SplitConfig.from_run_config({**TINY, **load(name)})
    history = local.run_local(config, num_clients=2).history
    assert len(history) == 1
    row = history.iloc[0]
    assert row["steps"] == 1 and row["num_clients"] == 2
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_accuracy"] <= 1.0
    if name in CODEC_PRESETS:
        saved = 1 - row["uplink_bytes"] / row["uplink_raw_bytes"]
        assert saved == pytest.approx(CODEC_PRESETS[name][1], abs=5e-3)
