"""The byte budget policy: exact sizes, never over budget, impossible budgets refused, the least
error chosen deterministically, labels, config keys and the preset."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch

from flwr_splitms.codecs import Payload, compression_error, decode_bytes, get_codec
from flwr_splitms.config import ConfigError, SplitConfig
from flwr_splitms.core import budget as B
from flwr_splitms.core.budget import BudgetError, CodecChoice, Measurement

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "strategies"
MS_PRESET = CodecChoice.of("ms", ratio=0.99, bits=2)


def relu(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def sparse(shape: tuple[int, ...], seed: int = 0, density: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g)) * (torch.rand(shape, generator=g) < density)


def dense_uniform(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) + 1.0


def wire(choice: CodecChoice, x: torch.Tensor) -> int:
    payload = choice.build().encode(x, generator=torch.Generator().manual_seed(0))
    return len(payload.to_bytes())


# -- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "signed"),
    [
        (relu((4, 8, 5, 7)), False),
        (torch.randn(4, 8, 5, 7, generator=torch.Generator().manual_seed(1)), True),
        (relu((3, 50)).half(), False),
        (relu((37,)), False),
    ],
    ids=["relu-4d", "signed-4d", "float16-2d", "1d"],
)
def test_wire_nbytes_is_the_length_of_the_message(x: torch.Tensor, signed: bool) -> None:
    grid = B.Grid(rt_ratios=(0.9, 0.99))  # RT too: same wire format as SP
    for choice in grid.settings():
        assert choice.wire_nbytes(x.shape, x.dtype, signed=signed) == wire(choice, x), choice.label


def test_zstd_settings_have_no_fixed_size() -> None:
    choice = CodecChoice.of("ms", ratio=0.99, bits=2, entropy="zstd")
    assert not choice.fixed_size and choice.without_entropy == MS_PRESET
    with pytest.raises(ValueError, match="depend on the data"):
        choice.wire_nbytes((4, 4))


def test_ms_preset_costs_what_the_paper_says() -> None:
    bits = MS_PRESET.wire_nbytes((64, 64, 32, 32)) * 8 / (64 * 64 * 32 * 32)
    assert bits == pytest.approx(2.32, abs=1e-3) and bits > 2.32  # the header on top


# -- never over budget --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0.5, 1.0, 2.3222, 3.0, 8.0, 20.0, 40.0])
def test_every_candidate_fits_and_measure_returns_only_fitting_settings(bits: float) -> None:
    x = relu((8, 16, 8, 8), seed=3)
    limit = B.budget_nbytes(bits, x.numel())
    found = B.candidates(x.shape, x.dtype, bits)
    assert found, "every budget here is feasible"
    for choice in found:
        assert wire(choice, x) <= limit, choice.label
    measured = B.measure(x, bits, sample=4)
    assert measured
    for label, m in measured.items():
        size = wire(CodecChoice.parse(label), x)  # the whole tensor, zstd included
        assert size <= limit, label
        if CodecChoice.parse(label).fixed_size:
            assert m.nbytes == size
        else:  # estimated from the sample, whose frame overheads weigh more: not optimistic
            assert size <= 1.02 * m.nbytes, (label, m.nbytes, size)


def test_measure_finds_zstd_settings_that_beat_every_fixed_one_on_relu_activations() -> None:
    x = relu((16, 16, 16, 16), seed=4)
    measured = B.measure(x, 2.3222, sample=4)
    zstd = [label for label in measured if "entropy=zstd" in label]
    assert zstd
    for label in zstd:  # the estimate from 4 of 16 rows is within a few percent
        size = wire(CodecChoice.parse(label), x)
        assert abs(measured[label].nbytes - size) <= 0.05 * size, (label, size)
    best = B.choose([measured])
    assert not best.fixed_size  # half the values are ReLU zeros: the codes compress
    fixed = B.choose([measured], fixed_size=True)
    assert measured[best.label].error < measured[fixed.label].error


def test_the_guard_reencodes_a_zstd_message_over_budget_on_incompressible_data() -> None:
    # Uniform codes compress to nothing: MS 3 bits + zstd stays about 3.3 bits per element.
    x = torch.rand(8, 16, 16, 16, generator=torch.Generator().manual_seed(5)) + 0.5
    bits = 2.5
    limit = B.budget_nbytes(bits, x.numel())
    zstd = CodecChoice.of("ms", ratio=0.99, bits=3, entropy="zstd")
    payload, error = zstd.build().encode_measured(x)
    assert payload.nbytes + payload.header_nbytes > limit
    fallback = CodecChoice.of("qu", bits=2)
    fitted, fitted_error = B.fit_to_budget(payload, error, x, bits, fallback)
    assert fitted is not payload and fitted.codec == "qu"
    blob = fitted.to_bytes()
    assert len(blob) <= limit
    assert fitted_error == pytest.approx(compression_error(x, decode_bytes(blob)), rel=1e-5)


def test_the_guard_leaves_a_fitting_message_alone() -> None:
    x = relu((4, 8, 8, 8))
    payload, error = MS_PRESET.build().encode_measured(x)
    fitted, same = B.fit_to_budget(payload, error, x, 3.0, MS_PRESET)
    assert fitted is payload and same == error


def test_the_guard_handles_a_sign_bit_the_probe_did_not_see() -> None:
    probe = relu((8, 16, 8, 8))
    bits = MS_PRESET.wire_nbytes(probe.shape) * 8 / probe.numel()
    fixed = B.Grid(zstd=False)
    decision = B.decide([B.measure(probe, bits, sample=4, grid=fixed)])
    assert decision.choice == decision.fallback == MS_PRESET  # the tightest fit
    later = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(2))  # signed
    payload, error = MS_PRESET.build().encode_measured(later)  # one bit more per element
    assert len(payload.to_bytes()) > B.budget_nbytes(bits, later.numel())
    fitted, _ = B.fit_to_budget(payload, error, later, bits, decision.fallback, measure_error=False)
    assert len(fitted.to_bytes()) <= B.budget_nbytes(bits, later.numel())
    assert decode_bytes(fitted.to_bytes()).shape == later.shape


def test_gradients_are_measured_with_the_sign_bit() -> None:
    grad = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(6)) * 1e-3
    measured = B.measure(grad, 4.0, sample=4, grid=B.DOWNLINK)
    for label in measured:
        assert wire(CodecChoice.parse(label), grad) <= B.budget_nbytes(4.0, grad.numel()), label
    assert any(label.startswith("ms ") for label in measured)


# -- impossible budgets -------------------------------------------------------------------------


def test_an_impossible_budget_names_the_smallest_feasible_one() -> None:
    shape = (16, 64, 32, 32)
    with pytest.raises(BudgetError) as info:
        B.check_budget(0.01, shape)
    line = str(info.value)
    assert "\n" not in line and line.startswith("budget-bits=0.01 is below")
    need = float(line.rsplit("at least ", 1)[1])
    smallest, choice = B.smallest_feasible(shape)
    assert need >= smallest and need - smallest < 1e-4 and choice.label in line
    B.check_budget(need, shape)  # the number it names does fit
    with pytest.raises(BudgetError):
        B.check_budget(smallest * (1 - 1e-6), shape)
    with pytest.raises(BudgetError, match="> 0"):
        B.check_budget(0.0, shape)
    with pytest.raises(BudgetError, match=r"grad-budget-bits=0\.01"):
        B.check_budget(0.01, shape, key="grad-budget-bits", what="gradients", signed=True)


def test_measure_refuses_an_impossible_budget() -> None:
    with pytest.raises(BudgetError, match="smallest feasible"):
        B.measure(relu((4, 8, 4, 4)), 0.01, sample=2)


# -- choosing -----------------------------------------------------------------------------------


def test_sparse_activations_favour_ms_or_sp_and_dense_uniform_ones_qu() -> None:
    for bits in (1.5, 2.5, 4.0):
        up = B.choose([B.measure(sparse((8, 16, 16, 16), seed=s), bits, sample=4) for s in (0, 1)])
        assert up.codec in ("ms", "sp"), (bits, up.label)
        flat = B.choose(
            [B.measure(dense_uniform((8, 16, 16, 16), s), bits, sample=4) for s in (0, 1)]
        )
        assert flat.codec == "qu", (bits, flat.label)


def test_choose_takes_the_least_mean_error_over_clients_then_fewer_bytes() -> None:
    a = {"qu bits=2": Measurement(0.30, 100), "sp ratio=0.99": Measurement(0.10, 90)}
    b = {"qu bits=2": Measurement(0.10, 100), "sp ratio=0.99": Measurement(0.40, 90)}
    assert B.choose([a, b]).label == "qu bits=2"  # mean 0.2 against 0.25
    tie = {"qu bits=2": Measurement(0.2, 100), "sp ratio=0.99": Measurement(0.2, 90)}
    assert B.choose([tie]).label == "sp ratio=0.99"
    # a setting one client could not fit does not count
    only_a = {**a, "ms ratio=0.99 bits=2 entropy=zstd": Measurement(0.01, 80)}
    assert B.choose([only_a, b]).label == "qu bits=2"
    # JSON-like pairs (as they come out of a record) work too
    assert B.choose([{k: list(v) for k, v in a.items()}]).label == "sp ratio=0.99"
    with pytest.raises(BudgetError, match="every client"):
        B.choose([{"qu bits=2": Measurement(0.1, 1)}, {"sp ratio=0.99": Measurement(0.1, 1)}])


def test_the_choice_is_deterministic_and_independent_of_client_order() -> None:
    clients = [B.measure(relu((8, 16, 8, 8), seed=s), 2.3222, sample=4) for s in range(4)]
    again = [B.measure(relu((8, 16, 8, 8), seed=s), 2.3222, sample=4) for s in range(4)]
    assert clients == again
    first = B.decide(clients)
    for order in ([3, 1, 0, 2], [2, 3, 1, 0]):
        assert B.decide([clients[i] for i in order]) == first
    assert first.fallback.fixed_size
    assert first.error == pytest.approx(
        sum(c[first.choice.label].error for c in clients) / len(clients)
    )


def test_measured_error_is_the_sample_error() -> None:
    x = relu((8, 16, 8, 8), seed=7)
    measured = B.measure(x, 3.0, sample=2)
    for label, m in measured.items():
        codec = CodecChoice.parse(label).build()
        _, error = codec.encode_measured(x[:2], generator=torch.Generator().manual_seed(0))
        assert m.error == pytest.approx(error), label


# -- labels -------------------------------------------------------------------------------------


def test_labels_round_trip() -> None:
    choices = [
        *B.Grid(rt_ratios=(0.95875,)).settings(),
        *(c for family in B.UPLINK.zstd_families() for c in family),
        CodecChoice.of("ms", ratio=0.9, bits=3, signed=True, scope="sample", rounding="floor"),
        CodecChoice.of("rt", ratio=0.95875, alpha=0.05),
    ]
    for choice in choices:
        assert CodecChoice.parse(choice.label) == choice
        assert CodecChoice.from_dict(choice.to_dict()) == choice
        assert choice.build() == get_codec(choice.codec, **choice.kwargs)
    assert MS_PRESET.label == "ms ratio=0.99 bits=2"
    assert CodecChoice.of("ms", bits=2, ratio=0.99, entropy="none") == MS_PRESET
    assert CodecChoice.parse("ms ratio=0.99 bits=2 entropy=zstd").label.endswith("entropy=zstd")
    signed = CodecChoice.of("ms", ratio=0.9, bits=3, signed=True)
    assert signed.label == "ms ratio=0.9 bits=3 signed=true"


@pytest.mark.parametrize(
    ("label", "match"),
    [
        ("ms ratio", "not key=value"),
        ("zz bits=2", "unknown codec"),
        ("qu ratio=0.9", "unknown parameter"),
        ("qu bits=2.5", "bits"),
        ("ms bits=2 bits=3", "twice"),
    ],
)
def test_bad_labels_say_why(label: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CodecChoice.parse(label)


# -- config keys, preset, study -----------------------------------------------------------------


def test_codec_budget_needs_budget_bits() -> None:
    with pytest.raises(ConfigError) as info:
        SplitConfig.from_run_config({"codec": "budget"})
    (line,) = info.value.problems
    assert line.startswith('budget-bits=0.0: codec="budget" needs a budget') and "2.32" in line
    config = SplitConfig.from_run_config({"codec": "budget", "budget-bits": 2})
    assert (config.codec, config.budget_bits, config.codec_params) == ("budget", 2.0, {})
    assert (config.grad_budget_bits, config.budget_every, config.budget_sample) == (0.0, 1, 4)
    assert config.unused_keys() == []
    assert SplitConfig(codec="budget", budget_bits=1.0, codec_ratio=0.9).unused_keys() == [
        "codec-ratio"
    ]


def test_budget_keys_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        SplitConfig.from_run_config(
            {"budget-bits": -1.0, "grad-budget-bits": "x", "budget-every": 0, "budget-sample": 0}
        )
    text = "\n".join(info.value.problems)
    for key in ("budget-bits=-1.0", "grad-budget-bits=", "budget-every=0", "budget-sample=0"):
        assert key in text
    # budget-bits without the policy is legal but reported as unused
    assert SplitConfig(budget_bits=2.0).unused_keys() == ["budget-bits"]
    assert SplitConfig(grad_budget_bits=8.0).grad_budget_bits == 8.0


def test_config_cli_reports_a_missing_budget(capsys: pytest.CaptureFixture[str]) -> None:
    from flwr_splitms.config.__main__ import main

    assert main(['codec="budget"']) == 1
    assert 'budget-bits=0.0: codec="budget" needs a budget' in capsys.readouterr().err
    assert main(['codec="budget"', "budget-bits=2.3222"]) == 0
    assert "budget-bits = 2.3222" in capsys.readouterr().out


def test_budget_preset_is_the_ms_preset_cost_at_the_default_study_shape() -> None:
    with (PRESETS / "budget.toml").open("rb") as handle:
        preset = tomllib.load(handle)
    config = SplitConfig.from_run_config(preset)
    assert config.codec == "budget"
    shape = (16, 256, 8, 8)  # studies/default.toml: deep cut, batch 16
    ms_bits = MS_PRESET.wire_nbytes(shape) * 8 / math.prod(shape)
    assert ms_bits <= config.budget_bits < ms_bits + 1e-4
    assert MS_PRESET in B.candidates(shape, torch.float32, config.budget_bits)
    assert MS_PRESET in B.candidates((64, 64, 32, 32), torch.float32, config.budget_bits)


def test_a_study_can_name_the_budget_policy() -> None:
    from flwr_splitms.study import StudySpec

    spec = StudySpec.from_dict(
        {
            "study": {"policies": ["none", "ms", "budget"], "cuts": ["deep"], "seeds": [0, 1]},
            "run-config": {"dataset": "synthetic", "data-download": False, "batch-size": 16},
        },
        base=ROOT,
    )
    runs = [r for r in spec.runs() if r.policy == "budget"]
    assert [r.name for r in runs] == ["budget-deep-s0", "budget-deep-s1"]
    config = runs[0].config()
    assert (config.codec, config.budget_bits, config.batch_size) == ("budget", 2.3222, 16)


def test_payload_header_counts_in_the_budget() -> None:
    # A 1-element tensor: the header alone is the message; the smallest budget says so.
    bits, choice = B.smallest_feasible((1,))
    assert bits == pytest.approx(8 * wire(choice, torch.ones(1)))
    assert isinstance(choice.build().encode(torch.ones(1)), Payload)
