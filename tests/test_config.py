"""SplitConfig: keys from one source, every problem reported at once, codec defaults per codec."""

import tomllib
from pathlib import Path

import pytest

from flwr_splitms.codecs import get_codec
from flwr_splitms.codecs.registry import codec_class
from flwr_splitms.config import ConfigError, SplitConfig, codec_param_specs, validate

EXAMPLE = Path(__file__).parents[1] / "examples" / "cifar100_resnet18" / "pyproject.toml"


def example_table() -> dict[str, object]:
    return tomllib.loads(EXAMPLE.read_text())["tool"]["flwr"]["app"]["config"]


def test_example_app_declares_exactly_the_config_keys() -> None:
    # Flower refuses a run-config key the app does not declare: every key must be in the table.
    run_config = example_table()
    assert list(run_config) == SplitConfig.keys()
    config = SplitConfig.from_run_config(run_config)
    # The paper's defaults: ResNet18 on CIFAR-100, MS with ratio 0.99 and 2 bits, SGD 0.1/0.9/5e-4.
    assert (config.arch, config.dataset, config.codec) == ("resnet18", "cifar100", "ms")
    assert (config.codec_ratio, config.codec_bits) == (0.99, 2)
    assert (config.lr, config.momentum, config.weight_decay) == (0.1, 0.9, 5e-4)
    assert (config.device, config.grad_codec, config.min_nodes) == ("auto", "none", 2)


def test_codec_keys_come_from_the_codecs_param_specs() -> None:
    declared = {f"codec-{s.name}" for specs in codec_param_specs().values() for s in specs}
    keys = SplitConfig.keys()
    assert {k for k in keys if k.startswith("codec-")} == declared
    assert "CODEC_PARAM_KEYS" not in vars(__import__("flwr_splitms.config").config)


@pytest.mark.parametrize("name", list(codec_param_specs()))
def test_unset_codec_parameters_take_the_codecs_own_defaults(name: str) -> None:
    config = SplitConfig.from_run_config({**example_table(), "codec": name})
    assert get_codec(name, **config.codec_params) == get_codec(name)


def test_qu_gets_three_bits_and_ms_two_unless_told() -> None:
    assert codec_class("qu").param_specs[0].default == 3
    assert SplitConfig(codec="qu").codec_params == {"bits": 3}
    assert SplitConfig(codec="qu").codec_bits == 3
    assert SplitConfig().codec_bits == 2
    assert SplitConfig(codec="qu", codec_bits=5).codec_params == {"bits": 5}
    assert SplitConfig().replace(codec="qu").codec_params == {"bits": 3}
    # a set value survives a change of codec
    assert SplitConfig(codec_bits=4).replace(codec="qu").codec_params == {"bits": 4}


def test_codec_params_follow_the_codec() -> None:
    assert SplitConfig(codec="none").codec_params == {}
    assert SplitConfig(codec="rt").codec_params == {"ratio": 0.99, "alpha": 0.1}
    ms = SplitConfig(codec="ms", codec_signed="true").codec_params
    assert ms["signed"] is True and ms["bits"] == 2 and ms["ratio"] == 0.99
    assert SplitConfig(codec_signed="true") == SplitConfig(codec_signed=True)


def test_grad_codec_keys_work_like_codec_keys() -> None:
    assert SplitConfig().grad_codec_params == {}
    config = SplitConfig.from_run_config({"grad-codec": "qu", "grad-codec-bits": 6})
    assert config.grad_codec_params == {"bits": 6}
    assert SplitConfig(grad_codec="qu").grad_codec_params == {"bits": 3}
    with pytest.raises(ConfigError, match="grad-codec-bits=99"):
        SplitConfig.from_run_config({"grad-codec": "qu", "grad-codec-bits": 99})


def test_unknown_key_names_the_closest_valid_one() -> None:
    with pytest.raises(
        ConfigError, match=r"codec-raito=0.9: unknown key; did you mean codec-ratio"
    ):
        SplitConfig.from_run_config({"codec-raito": 0.9})


def test_unknown_keys_kept_when_not_strict() -> None:
    config = SplitConfig.from_run_config({"my-key": 1, "lr": 0.5}, strict=False)
    assert config.extra == {"my-key": 1} and config.lr == 0.5


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch-size", "64", 'batch-size="64": expects an int'),
        ("lr", True, "lr=true: expects a float"),
        ("codec", "zip", 'codec="zip": unknown codec; allowed: none, qu'),
        ("codec", "mss", 'did you mean codec="ms"'),
        ("lr-schedule", "cosin", 'did you mean lr-schedule="cosine"'),
        ("batch-size", 0, "batch-size=0: must be an integer >= 1; closest valid: batch-size=1"),
        ("fraction-train", 0.0, r"must be a number in \(0, 1\]; default: fraction-train=1.0"),
        ("fraction-evaluate", 1.5, r"closest valid: fraction-evaluate=1.0"),
        ("lr", -1.0, "lr=-1.0: must be a number > 0"),
        ("codec-ratio", 1.5, r"codec-ratio=1.5: 'ms' takes a number in \(0, 1\)"),
        ("codec-bits", 9, r"'ms' takes an integer in 1..8; its default: codec-bits=2"),
        ("codec-scope", "batch", '\'ms\' takes one of "tensor", "sample"'),
        ("cut", "deeep", "not a cut of resnet18; allowed: shallow, medium, deep or a stage index"),
        ("cut", 10, r"cut=\"10\": not a cut of resnet18.*index 1..9"),
        ("dataset", "cifar-100", 'did you mean dataset="cifar100"'),
        ("partition", "dirichlet2", 'did you mean partition="dirichlet"'),
        ("arch", "resnet50", "unknown arch; allowed: vgg19, resnet18, resnet34"),
        ("device", "gpu", 'device="gpu": not a device; allowed: auto, cpu, cuda, cuda:N, mps'),
        ("num-classes", 10, "num-classes=10: cifar100 has 100 classes"),
        ("steps-per-message", 0, "steps-per-message=0: must be an integer >= 1"),
        ("error-every", 0, "error-every=0: must be an integer >= 1"),
        ("keep-checkpoints", 0, "keep-checkpoints=0"),
        ("min-nodes", 0, "min-nodes=0"),
        ("node-wait", -1.0, "node-wait=-1.0: must be a number >= 0"),
        ("wait-factor", 0.5, "wait-factor=0.5: must be a number >= 1"),
        ("wait-floor", -1.0, "wait-floor=-1.0: must be a number >= 0"),
        ("resume", "yes", 'resume="yes": expects a bool'),
        ("momentum", 1.0, r"momentum=1.0: must be a number in \[0, 1\)"),
    ],
)
def test_bad_values_are_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SplitConfig.from_run_config({key: value})
    assert any(key in line for line in validate({key: value}))


def test_every_problem_is_reported_at_once() -> None:
    bad = {"steps-per-rnd": 2, "codec": "ms", "codec-ratio": 1.5, "batch-size": 0, "cut": "x"}
    problems = validate(bad)
    assert len(problems) == 4, problems
    with pytest.raises(ConfigError) as info:
        SplitConfig.from_run_config(bad)
    assert info.value.problems == problems
    assert str(info.value) == "\n".join(problems)
    assert validate({}) == [] and validate(example_table()) == []


def test_valid_values_pass() -> None:
    config = SplitConfig.from_run_config(
        {"cut": 3, "device": "cuda:1", "codec": "qu", "codec-bits": 4.0, "lr": 1, "seed": 0}
    )
    assert (config.cut, config.device, config.codec_params, config.lr) == (
        "3",
        "cuda:1",
        {"bits": 4},
        1.0,
    )
    assert isinstance(config.lr, float)


def test_parameters_of_another_codec_are_reported_as_unused() -> None:
    config = SplitConfig.from_run_config({"codec": "qu", "codec-ratio": 0.9})
    assert config.codec_params == {"bits": 3}
    assert config.unused_keys() == ["codec-ratio"]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="batch-size=0"):
        SplitConfig(batch_size=0)
    with pytest.raises(ConfigError, match="codec-bits=0"):
        SplitConfig(codec="qu", codec_bits=0)
    with pytest.raises(TypeError):
        SplitConfig(codec_nonsense=1)


def test_batch_size_is_checked_against_the_partitions() -> None:
    assert validate({"batch-size": 8}, partition_sizes=[10, 9, 8]) == []
    (line,) = validate({"batch-size": 64}, partition_sizes=[100, 40, 100])
    assert line.startswith("batch-size=64: larger than the training data of client partition 1")
    assert "closest valid: batch-size=40" in line
    # the local test split comes out of the partition first
    assert validate({"batch-size": 10}, partition_sizes=[10]) == []
    assert validate({"batch-size": 10, "local-test-fraction": 0.1}, partition_sizes=[10]) != []


def test_run_config_round_trip() -> None:
    config = SplitConfig(codec="sp", cut="deep", batch_size=7, codec_ratio=0.9, grad_codec="fp16")
    run_config = config.to_run_config()
    assert list(run_config) == SplitConfig.keys()
    assert run_config["codec-ratio"] == 0.9 and run_config["codec-bits"] == ""
    assert SplitConfig.from_run_config(run_config) == config
    assert hash(config) == hash(SplitConfig.from_run_config(run_config))
