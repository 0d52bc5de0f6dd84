"""``SplitConfig``: the typed record of one run's settings, and the checks behind it.

Every setting is a field here with its default and its rule (``rules``); the codec parameters
come from the codecs (``codec_keys``). :func:`validate` reports every problem of a run-config
at once, before any data or model is built, and :meth:`SplitConfig.from_run_config` raises
:class:`ConfigError` with those lines.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr_splitms.core.schedule import LR_SCALINGS, LR_SCHEDULES

from .codec_keys import (
    CODEC_PREFIX,
    GRAD_CODEC_PREFIX,
    allowed,
    codec_param_specs,
    coerce_param,
    grad_codec_param_specs,
    option_keys,
)
from .rules import Choices, NonEmpty, Range, Rule, closest, show

__all__ = ["BUDGET", "LR_SCHEDULES", "ConfigError", "SplitConfig", "validate"]

log = logging.getLogger("flwr")

BUDGET = "budget"
"""``codec = "budget"``: not a codec but the policy that picks, within ``budget-bits``, the codec
setting with the least measured error (``flwr_splitms.core.budget``)."""
_OPTION_FIELDS = ("codec_options", "grad_codec_options", "extra")
Options = tuple[tuple[str, Any], ...]


class ConfigError(ValueError):
    """A run-config with problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _datasets() -> Sequence[str]:
    from flwr_splitms.data import DATASETS

    return DATASETS


def _schemes() -> Sequence[str]:
    from flwr_splitms.data import PARTITION_SCHEMES

    return PARTITION_SCHEMES


def _archs() -> Sequence[str]:
    from flwr_splitms.models import ARCHS

    return ARCHS


def _codecs() -> Sequence[str]:
    return [*codec_param_specs(), BUDGET]


def _grad_codecs() -> Sequence[str]:
    return list(grad_codec_param_specs())


class _Device(Rule):
    """A device name (availability is checked where the run starts, see ``devices``)."""

    def problem(self, key: str, value: object) -> str | None:
        from flwr_splitms.devices import DEVICE_SPECS, parse_device_spec

        try:
            parse_device_spec(str(value))
        except ValueError:
            near = closest(str(value), ["auto", "cpu", "cuda", "mps"])
            hint = f"; did you mean {key}={show(near)}?" if near else ""
            return f"{key}={show(value)}: not a device; allowed: {DEVICE_SPECS}{hint}"
        return None


def _setting(default: Any, rule: Rule | None = None) -> Any:
    return field(default=default, metadata={"rule": rule} if rule else {})


WARMUP_STEPS = 10
HEAD_LR_SCALE = 0.1
AGGREGATORS: dict[str, str] = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "bulyan": "Bulyan",
}
"""``aggregator`` names and the Flower strategies (``flwr.serverapp.strategy``) they build."""
POSITIVE = Range(1, integer=True)
COUNT = Range(0, integer=True)
FRACTION_OPEN = Range(0, 1, low_open=True)  # (0, 1]


@dataclass(frozen=True)
class _Settings:
    """The fields of :class:`SplitConfig` (kept apart so that it can take ``codec_*`` keywords)."""

    dataset: str = _setting("cifar100", Choices(_datasets, "dataset"))
    data_root: str = _setting("~/.cache/flwr-splitms/data", NonEmpty("~/data"))
    data_download: bool = True
    num_classes: int = _setting(0, COUNT)  # 0 = the dataset's own number of classes
    synthetic_size: int = _setting(5000, POSITIVE)  # synthetic training images (test: a fifth)
    partition: str = _setting("iid", Choices(_schemes, "partition scheme"))
    dirichlet_alpha: float = _setting(0.5, Range(0, low_open=True))
    local_test_fraction: float = _setting(0.0, Range(0, 1, high_open=True))
    arch: str = _setting("resnet18", Choices(_archs, "arch"))
    cut: str = "shallow"  # a name or a stage index; checked against the arch
    codec: str = _setting("ms", Choices(_codecs, "codec"))
    codec_options: Options = ()  # the codec-* keys that are set: ((param name, value), ...)
    grad_codec: str = _setting("none", Choices(_grad_codecs, "gradient codec"))
    grad_codec_options: Options = ()  # the grad-codec-* keys that are set
    num_server_rounds: int = _setting(3, POSITIVE)
    fraction_train: float = _setting(1.0, FRACTION_OPEN)
    fraction_evaluate: float = _setting(0.0, Range(0, 1))
    aggregator: str = _setting("fedavg", Choices(lambda: tuple(AGGREGATORS), "aggregator"))
    min_nodes: int = _setting(2, POSITIVE)  # nodes to wait for before the first round
    node_wait: float = _setting(60.0, Range(0))  # seconds to wait for them
    steps_per_round: int = _setting(0, COUNT)  # 0 = one local epoch of the smallest partition
    steps_per_message: int = _setting(1, POSITIVE)  # batches one client sends per message
    batch_size: int = _setting(64, POSITIVE)
    eval_batch_size: int = _setting(256, POSITIVE)
    eval_max_examples: int = _setting(0, COUNT)  # 0 = the whole test set
    error_every: int = _setting(1, POSITIVE)  # compression error every N steps
    lr: float = _setting(0.1, Range(0, low_open=True))
    momentum: float = _setting(0.9, Range(0, 1, high_open=True))
    weight_decay: float = _setting(5e-4, Range(0))
    lr_schedule: str = _setting("cosine", Choices(lambda: LR_SCHEDULES, "lr schedule"))
    lr_scaling: str = _setting("sqrt", Choices(lambda: LR_SCALINGS, "lr scaling"))
    warmup_steps: int = _setting(WARMUP_STEPS, COUNT)  # linear lr ramp over the run's first steps
    head_lr_scale: float = _setting(HEAD_LR_SCALE, Range(0))  # the output layer's share of lr
    reestimate_bn: bool = True  # round end: both halves' BatchNorm statistics of their weights
    augment: bool = True
    seed: int = _setting(42, COUNT)
    device: str = _setting("auto", _Device())
    output_dir: str = _setting("outputs", NonEmpty("outputs"))
    resume: bool = False  # continue from the last checkpoint in output-dir
    keep_checkpoints: int = _setting(1, POSITIVE)  # each about 90 MB for ResNet18 shallow
    step_timeout: float = _setting(600.0, Range(0, low_open=True))
    wait_factor: float = _setting(5.0, Range(1))  # per-step wait: this x the slowest recent reply
    wait_floor: float = _setting(10.0, Range(0))  # ... and at least this many seconds
    # codec = "budget" (core/budget.py): budget-bits = bits per activation element on the wire,
    # headers included (0 = unset; MS 0.99/2 bits costs about 2.32); grad-budget-bits the same
    # for the gradients (0 = grad-codec as set). The server chooses at run start and every
    # budget-every rounds (1: one probe round trip per round, 1/steps-per-round of its time, and
    # the choice follows the features as training makes them sparser), from the error on the
    # first budget-sample rows of a batch (4 of 64: the error to within ~1%, <2% of a step).
    budget_bits: float = _setting(0.0, Range(0))
    grad_budget_bits: float = _setting(0.0, Range(0))
    budget_every: int = _setting(1, POSITIVE)
    budget_sample: int = _setting(4, POSITIVE)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class SplitConfig(_Settings):
    """All settings of one SplitFed run; defaults follow the paper (ResNet18, CIFAR-100, MS).

    Build it from Flower's run-config (:meth:`from_run_config`, hyphenated keys) or with
    keywords (underscores). Codec parameters are keywords too: ``SplitConfig(codec="qu",
    codec_bits=3)``; a parameter that is not given takes the chosen codec's own default, so
    ``SplitConfig(codec="qu").codec_params == {"bits": 3}`` while MS gets 2 bits. The same holds
    for ``grad_codec_*``. Invalid settings raise :class:`ConfigError` listing every problem.
    """

    def __init__(self, **settings: Any) -> None:
        codec = _take_options(settings, "codec_", "codec_options")
        grad = _take_options(settings, "grad_codec_", "grad_codec_options")
        super().__init__(**settings, codec_options=codec, grad_codec_options=grad)
        problems = _problems(self._values(), dict(codec), dict(grad))
        if problems:
            raise ConfigError(problems)
        # normalize: 1 -> 1.0 for a float field, cut 3 -> "3", codec-signed "true" -> True
        for name, f in _fields().items():
            object.__setattr__(self, name, _coerce(getattr(self, name), f.default))
        object.__setattr__(
            self, "codec_options", _normalized(codec, self.codec, codec_param_specs())
        )
        object.__setattr__(
            self,
            "grad_codec_options",
            _normalized(grad, self.grad_codec, grad_codec_param_specs()),
        )

    def __getattr__(self, name: str) -> Any:
        """``codec_<param>`` / ``grad_codec_<param>``: the value the run uses (see the class)."""
        for prefix, specs_of, chosen, options in (
            ("grad_codec_", grad_codec_param_specs, "grad_codec", "grad_codec_options"),
            ("codec_", codec_param_specs, "codec", "codec_options"),
        ):
            if name.startswith(prefix) and name not in _OPTION_FIELDS:
                param = name[len(prefix) :]
                if f"{prefix}{param}".replace("_", "-") not in _option_keys(prefix):
                    break
                specs = {s.name: s for s in specs_of().get(self.__dict__.get(chosen, ""), ())}
                given = dict(self.__dict__.get(options, ()))
                if param in given:
                    return given[param]
                return specs[param].default if param in specs else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _fields()}

    @property
    def codec_params(self) -> dict[str, Any]:
        """Parameters of the chosen codec, as ``get_codec(codec, **codec_params)`` takes them."""
        return _effective(codec_param_specs().get(self.codec, ()), dict(self.codec_options))

    @property
    def grad_codec_params(self) -> dict[str, Any]:
        """Parameters of the gradient codec (``grad-codec-*`` keys, else its defaults)."""
        specs = grad_codec_param_specs()[self.grad_codec]
        return _effective(specs, dict(self.grad_codec_options))

    def unused_keys(self) -> list[str]:
        """``codec-*``/``grad-codec-*`` keys that are set but the chosen codec does not take."""
        unused = []
        for prefix, chosen, options, specs in (
            ("codec-", self.codec, self.codec_options, codec_param_specs()),
            ("grad-codec-", self.grad_codec, self.grad_codec_options, grad_codec_param_specs()),
        ):
            names = {s.name for s in specs.get(chosen, ())}
            unused += [prefix + _key(p) for p, _ in options if p not in names]
        if self.budget_bits and self.codec != BUDGET:
            unused.append("budget-bits")
        return unused

    @classmethod
    def keys(cls) -> list[str]:
        """The run-config keys this record understands (an app must declare all of them)."""
        keys = []
        for name in _fields():
            keys.append(_key(name))
            if name == "codec":
                keys += _option_keys("codec_")
            elif name == "grad_codec":
                keys += _option_keys("grad_codec_")
        return keys

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], *, strict: bool = True) -> SplitConfig:
        """Build from Flower's run-config (hyphenated keys), checking every key and value.

        With ``strict``, a key this record does not know is a problem that names the closest
        valid key; without it, unknown keys are kept in ``extra`` (an app may add its own keys).
        An empty string for a ``codec-*`` key means "not set" (the codec's default); that is how
        an app's ``pyproject.toml`` declares the key without fixing its value. Raises
        :class:`ConfigError` with one line per problem.
        """
        values, codec, grad, extra, problems = _parse(run_config, strict=strict)
        problems += _problems(values, codec, grad)
        if problems:
            raise ConfigError(problems)
        config = cls(
            **values, extra=extra, codec_options=_pairs(codec), grad_codec_options=_pairs(grad)
        )
        for key in config.unused_keys():
            log.warning("run-config key %r is set but codec does not use it; ignored", key)
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The hyphenated key/value form (what ``flwr run --run-config`` takes).

        Every key of :meth:`keys` is present; codec parameters that are not set are ``""``.
        """
        options = {
            "codec_": dict(self.codec_options),
            "grad_codec_": dict(self.grad_codec_options),
        }
        out: dict[str, Any] = {}
        for key in self.keys():
            name = key.replace("-", "_")
            prefix = "grad_codec_" if name.startswith("grad_codec_") else "codec_"
            if key in _option_keys(prefix):
                out[key] = options[prefix].get(name[len(prefix) :], "")
            else:
                out[key] = getattr(self, name)
        return out

    def replace(self, **changes: Any) -> SplitConfig:
        """A copy with some settings changed (underscore names, ``codec_*`` included).

        Changing ``codec`` keeps the codec parameters that were set; unset ones follow the new
        codec's defaults.
        """
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Parsing and checking
# ---------------------------------------------------------------------------------------------


def validate(
    run_config: Mapping[str, Any],
    *,
    partition_sizes: Sequence[int] | None = None,
    strict: bool = True,
) -> list[str]:
    """Every problem of a run-config, one line each (empty when it is valid).

    Cheap: it reads names from the codec, model and data registries but builds nothing.
    ``partition_sizes`` (training examples per client partition, as the app will create them)
    adds the check that every client can fill a batch.
    """
    values, codec, grad, _, problems = _parse(run_config, strict=strict)
    problems += _problems(values, codec, grad)
    if partition_sizes is not None and not problems:
        problems += _partition_problems(values, partition_sizes)
    return problems


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(_Settings) if f.name not in _OPTION_FIELDS}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _option_keys(prefix: str) -> list[str]:
    if prefix == "codec_":
        return option_keys(CODEC_PREFIX, codec_param_specs())
    return option_keys(GRAD_CODEC_PREFIX, grad_codec_param_specs())


def _take_options(settings: dict[str, Any], prefix: str, field_name: str) -> Options:
    """Move ``<prefix><param>`` keywords out of ``settings`` into an options tuple."""
    options = dict(settings.pop(field_name, ()))
    other = "grad_codec_" if prefix == "codec_" else None
    for name in list(settings):
        if name.startswith(prefix) and not (other and name.startswith(other)):
            param = name[len(prefix) :]
            if f"{prefix}{param}".replace("_", "-") not in _option_keys(prefix):
                continue  # not a codec parameter: the dataclass reports the unknown keyword
            value = settings.pop(name)
            if value is None or value == "":
                options.pop(param, None)
            else:
                options[param] = value
    return _pairs(options)


def _pairs(options: Mapping[str, Any]) -> Options:
    return tuple(sorted(options.items()))


def _normalized(options: Options, chosen: str, all_specs: Mapping[str, Sequence[Any]]) -> Options:
    """Options with the chosen codec's parameters in their canonical form (``"true"`` -> True)."""
    specs = {s.name: s for s in all_specs.get(chosen, ())}
    return tuple((p, coerce_param(specs[p], v) if p in specs else v) for p, v in options)


def _effective(specs: Sequence[Any], given: Mapping[str, Any]) -> dict[str, Any]:
    return {s.name: coerce_param(s, given[s.name]) if s.name in given else s.default for s in specs}


def _parse(
    run_config: Mapping[str, Any], *, strict: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """Split a run-config into field values, codec options, extras, and type problems."""
    fields = _fields()
    values: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {"codec_": {}, "grad_codec_": {}}
    extra: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        prefix = "grad_codec_" if name.startswith("grad_codec_") else "codec_"
        if key in _option_keys(prefix):
            if value != "":
                options[prefix][name[len(prefix) :]] = value
        elif name in fields and key == _key(name):
            try:
                values[name] = _coerce(value, fields[name].default)
            except ValueError as e:
                problems.append(f"{key}={show(value)}: {e}")
        elif strict:
            near = closest(str(key), SplitConfig.keys())
            hint = f"; did you mean {near}?" if near else "; see the key list of SplitConfig.keys()"
            problems.append(f"{key}={show(value)}: unknown key{hint}")
        else:
            extra[key] = value
    return values, options["codec_"], options["grad_codec_"], extra, problems


def _coerce(value: Any, default: Any) -> Any:
    """``value`` as the type of the field's ``default``; ValueError saying what was expected."""
    expected = type(default)
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # cut = 3 (a stage index)
    article = "an" if expected.__name__[0] in "aeiou" else "a"
    raise ValueError(
        f"expects {article} {expected.__name__}, got {type(value).__name__}; e.g. {show(default)}"
    )


def _problems(
    values: Mapping[str, Any], codec: Mapping[str, Any], grad: Mapping[str, Any]
) -> list[str]:
    """Range, choice and cross-field problems of type-correct ``values`` (missing = default)."""
    fields = _fields()
    v = {name: values.get(name, f.default) for name, f in fields.items()}
    problems: list[str] = []
    for name, f in fields.items():
        if name not in values:
            continue
        try:
            _coerce(v[name], f.default)
        except ValueError as e:
            problems.append(f"{_key(name)}={show(v[name])}: {e}")
            v[name] = f.default
            continue
        rule = f.metadata.get("rule")
        line = rule.problem(_key(name), v[name]) if rule else None
        if line and "closest valid" not in line and "did you mean" not in line:
            line += f"; default: {_key(name)}={show(f.default)}"
        if line:
            problems.append(line)
    problems += _cut_problems(v)
    problems += _option_problems("codec-", v["codec"], codec, codec_param_specs())
    problems += _option_problems("grad-codec-", v["grad_codec"], grad, grad_codec_param_specs())
    problems += _class_problems(v)
    problems += _budget_problems(v)
    return problems


def _cut_problems(v: Mapping[str, Any]) -> list[str]:
    from flwr_splitms.models import ARCHS, CUT_NAMES, cut_index, num_stages

    if v["arch"] not in ARCHS:
        return []  # reported by the arch rule
    cut = v["cut"]
    try:
        cut_index(v["arch"], int(cut) if isinstance(cut, str) and cut.strip().isdigit() else cut)
    except ValueError:
        last = num_stages(v["arch"]) - 1
        line = (
            f"cut={show(cut)}: not a cut of {v['arch']}; allowed: {', '.join(CUT_NAMES)} "
            f"or a stage index 1..{last}"
        )
        near = closest(str(cut), list(CUT_NAMES))
        return [line + (f"; did you mean cut={show(near)}?" if near else "")]
    return []


def _option_problems(
    prefix: str, chosen: str, given: Mapping[str, Any], all_specs: Mapping[str, Sequence[Any]]
) -> list[str]:
    """Check the set codec parameters against the chosen codec's own specs."""
    if chosen not in all_specs:
        return []  # reported by the codec rule
    problems = []
    for spec in all_specs[chosen]:
        if spec.name not in given:
            continue
        key = prefix + _key(spec.name)
        try:
            coerce_param(spec, given[spec.name])
        except ValueError:
            problems.append(
                f"{key}={show(given[spec.name])}: {chosen!r} takes {allowed(spec)}; "
                f"its default: {key}={show(spec.default)}"
            )
    return problems


def _class_problems(v: Mapping[str, Any]) -> list[str]:
    """``num-classes`` against the dataset (the data module knows which fix their classes)."""
    from flwr_splitms.data import dataset_num_classes

    n, dataset = v["num_classes"], v["dataset"]
    if dataset not in _datasets():
        return []  # reported by the dataset rule
    try:
        dataset_num_classes(dataset, n or None)
    except ValueError as e:
        return [f"num-classes={n}: {e}; closest valid: num-classes=0 (the dataset's own)"]
    if dataset == "synthetic" and n == 1:
        return ["num-classes=1: synthetic data needs >= 2 classes; closest valid: num-classes=2"]
    return []


def _budget_problems(v: Mapping[str, Any]) -> list[str]:
    """``codec = "budget"`` needs ``budget-bits``."""
    if v["codec"] == BUDGET and not v["budget_bits"]:
        return [
            f'budget-bits={show(v["budget_bits"])}: codec="budget" needs a budget, the bits per '
            "activation element the uplink may send, headers included; e.g. budget-bits=2.3202 "
            "(what MS 0.99/2 bits costs, strategies/budget.toml)"
        ]
    return []


def _partition_problems(values: Mapping[str, Any], sizes: Sequence[int]) -> list[str]:
    """Every client must fill one training batch from its own partition."""
    fields = _fields()
    batch = values.get("batch_size", fields["batch_size"].default)
    test_fraction = values.get("local_test_fraction", fields["local_test_fraction"].default)
    if not sizes:
        return []
    problems = []
    train = [n - _test_count(n, test_fraction) for n in sizes]
    smallest = min(train)
    if test_fraction > 0 and min(sizes) < 2:
        problems.append(
            f"local-test-fraction={show(test_fraction)}: a partition has {min(sizes)} example(s), "
            "too few to split off a test part; closest valid: local-test-fraction=0.0"
        )
    elif batch > smallest:
        where = train.index(smallest)
        problems.append(
            f"batch-size={batch}: larger than the training data of client partition {where} "
            f"({smallest} examples of {len(sizes)} partitions); closest valid: "
            f"batch-size={max(smallest, 1)} (or use fewer clients)"
        )
    return problems


def _test_count(n: int, fraction: float) -> int:
    """Examples ``load_partition`` moves to the local test split (0 when there is none)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(1, round(fraction * n)), n - 1)
