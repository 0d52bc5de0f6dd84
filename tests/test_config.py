import tomllib
from pathlib import Path

import pytest

from flwr_splitms.config import SplitConfig

EXAMPLE = Path(__file__).parents[1] / "examples" / "cifar100_resnet18" / "pyproject.toml"


def test_example_run_config_is_a_valid_split_config() -> None:
    run_config = tomllib.loads(EXAMPLE.read_text())["tool"]["flwr"]["app"]["config"]
    config = SplitConfig.from_run_config(run_config)
    assert set(run_config) == set(SplitConfig.keys())
    # The paper's defaults: ResNet18 on CIFAR-100, MS with ratio 0.99 and 2 bits, SGD 0.1/0.9/5e-4.
    assert (config.arch, config.dataset, config.codec) == ("resnet18", "cifar100", "ms")
    assert (config.codec_ratio, config.codec_bits) == (0.99, 2)
    assert (config.lr, config.momentum, config.weight_decay) == (0.1, 0.9, 5e-4)


def test_unknown_key_names_the_closest_valid_one() -> None:
    with pytest.raises(ValueError, match="did you mean 'codec-ratio'"):
        SplitConfig.from_run_config({"codec-raito": 0.9})


def test_unknown_keys_kept_when_not_strict() -> None:
    config = SplitConfig.from_run_config({"my-key": 1, "lr": 0.5}, strict=False)
    assert config.extra == {"my-key": 1} and config.lr == 0.5


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch-size", "64", "expects a int"),
        ("lr", True, "expects a float"),
        ("codec", "zip", "unknown codec 'zip'"),
        ("lr-schedule", "linear", "unknown lr-schedule"),
        ("batch-size", 0, "batch-size must be >= 1"),
        ("fraction-train", 0.0, "fraction-train must be in"),
        ("lr", -1.0, "lr must be a positive"),
    ],
)
def test_bad_values_are_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitConfig.from_run_config({key: value})


def test_codec_params_follow_the_codec() -> None:
    assert SplitConfig(codec="none").codec_params == {}
    assert SplitConfig(codec="qu", codec_bits=3).codec_params == {"bits": 3}
    assert SplitConfig(codec="rt").codec_params == {"ratio": 0.99, "alpha": 0.1}
    ms = SplitConfig(codec="ms", codec_signed="true").codec_params
    assert ms == {
        "ratio": 0.99,
        "bits": 2,
        "rounding": "nearest",
        "signed": True,
        "scope": "tensor",
    }


def test_run_config_round_trip() -> None:
    config = SplitConfig(codec="sp", cut="deep", batch_size=7)
    assert SplitConfig.from_run_config(config.to_run_config()) == config
