"""Run-config keys of codec parameters, derived from the codecs' own ``param_specs``.

A codec declares its parameters once (``flwr_splitms.codecs.params.Param``: name, default,
validation). This module turns them into run-config keys: parameter ``bits`` of the activation
codec is ``codec-bits``, of the gradient codec ``grad-codec-bits``. A key applies only when it is
set; unset, the chosen codec's own default is used (QU quantizes with its 3 bits, MS masks with
its 2). Adding a parameter to a codec therefore adds its key here with no other change.

The gradient codecs come from ``flwr_splitms.codecs.downlink`` when that module exists; without
it they are the registered activation codecs (``none`` sends raw gradients).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping

from flwr_splitms.codecs.params import Choice, FloatRange, IntRange, Param
from flwr_splitms.codecs.registry import codec_class, codec_names

__all__ = [
    "CODEC_PREFIX",
    "GRAD_CODEC_PREFIX",
    "codec_param_specs",
    "coerce_param",
    "grad_codec_param_specs",
    "option_keys",
]

CODEC_PREFIX = "codec-"
GRAD_CODEC_PREFIX = "grad-codec-"

Specs = Mapping[str, tuple[Param, ...]]


@functools.cache
def codec_param_specs() -> dict[str, tuple[Param, ...]]:
    """``{codec name: its Param specs}`` for every registered activation codec."""
    import flwr_splitms.codecs  # noqa: F401  (registers the codecs)

    return {name: tuple(codec_class(name).param_specs) for name in codec_names()}


@functools.cache
def grad_codec_param_specs() -> dict[str, tuple[Param, ...]]:
    """``{gradient codec name: its Param specs}``; the activation codecs without ``downlink``."""
    try:
        downlink = importlib.import_module("flwr_splitms.codecs.downlink")
    except ModuleNotFoundError as e:
        if e.name != "flwr_splitms.codecs.downlink":
            raise
        return codec_param_specs()
    registered = codec_param_specs()
    specs: dict[str, tuple[Param, ...]] = {}
    for name in downlink.grad_codec_names():
        if name in registered:  # an activation codec applied to the gradient
            specs[name] = registered[name]
        else:  # a gradient-only codec (``mask``): its class declares its parameters
            codec = downlink.get_grad_codec(name)  # defaults only: cheap, no tensor
            specs[name] = tuple(getattr(type(codec), "param_specs", ()))
    return specs


def option_keys(prefix: str, specs: Specs) -> list[str]:
    """Run-config keys of every parameter any codec in ``specs`` declares (first-seen order)."""
    keys: dict[str, None] = {}
    for params in specs.values():
        for spec in params:
            keys[prefix + spec.name.replace("_", "-")] = None
    return list(keys)


def coerce_param(spec: Param, value: object) -> object:
    """Validate a run-config value for ``spec``, accepting TOML's spellings of its values.

    Run-configs carry only bool, int, float and str: ``"true"`` stands for True in a choice of
    booleans, and an integral float (``3.0``) for an integer. Raises ValueError like
    ``Param.validate``.
    """
    if isinstance(spec, Choice) and isinstance(value, str):
        for choice in spec.choices:
            if str(choice).lower() == value.strip().lower():
                return spec.validate(choice)
    if isinstance(spec, IntRange) and isinstance(value, float) and value.is_integer():
        value = int(value)
    return spec.validate(value)


def allowed(spec: Param) -> str:
    """What ``spec`` accepts, in run-config spelling (for error lines)."""
    if isinstance(spec, Choice):
        return "one of " + ", ".join(_toml(c) for c in spec.choices)
    if isinstance(spec, IntRange):
        return f"an integer in {spec.low}..{spec.high}"
    if isinstance(spec, FloatRange):
        left = "[" if spec.low_closed else "("
        right = "]" if spec.high_closed else ")"
        return f"a number in {left}{spec.low:g}, {spec.high:g}{right}"
    return "a valid value"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
