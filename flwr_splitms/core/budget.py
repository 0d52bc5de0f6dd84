"""A byte budget: the codec setting that loses least for the bytes a user can afford.

A user states a budget in bits per element on the wire, headers included (the x-axis of the
paper's Fig. 2; MS at ratio 0.99 with a 2-bit mask costs about 2.32). The paper fixes one
policy for every cut and round, yet the error at a given rate depends on the cut and on the
data, and trained features are sparser than untrained ones. So the policy measures, on a small
sample of the current tensor, the error of every setting of a grid (:class:`Grid`: MS ratio x
mask bits, with and without the zstd stage; QU bits; SP ratios; bf16; raw) that fits the
budget, and takes the least mean error over the clients.

The pieces, in the order a round driver calls them:

* :func:`check_budget` -- refuse an impossible budget at start, naming the smallest feasible.
* :func:`measure` -- on one client's tensor (activations, or the server's gradients): the
  relative error and message size of each candidate that fits, as ``{label: Measurement}``.
* :func:`decide` (:func:`choose`) -- the least mean error over clients, deterministic; also
  the fixed-size fallback for the guard.
* :func:`fit_to_budget` -- after encoding: a message over budget (only the data-dependent
  zstd stage, or an MS sign bit the probe did not see, can cause one) is re-encoded with a
  fixed-size setting that fits, so no message is ever over budget.

Sizes. Every setting without the zstd stage has a data-independent size for a given shape and
dtype (MS: plus one bit per element when the tensor has negative values): the codec's own
section layout (``Codec.expected_section_nbytes``, what its decoder checks) plus the payload
header, i.e. ``len(payload.to_bytes())``, computed without encoding. A zstd setting's size is
estimated from the sample: each section's compression factor on the sample times the section's
length for the whole tensor; the estimate must stay ``ZSTD_MARGIN`` below the budget, and the
guard catches the rest.

Pruning. Within a family (a codec with every parameter but one knob fixed: MS at one mask
width and SP vary the ratio, QU the bits), more bytes mean less error: keeping more values (a
lower ratio) makes SP's dropped part smaller and MS's Top_min lower (finer mask steps, more
exact values); more QU bits make finer steps. So only the most precise fitting setting of each
family is measured. MS with zstd is searched per mask width (:func:`_zstd_search`, one or two
encodes). That is 7 to 15 encodes of the sample instead of a few hundred: on ResNet18's shallow
cut at batch 64 (4 of 64 rows, one CPU thread) the probe took 1.5% of a training step; its
errors were within 2.5% of the whole batch's (QU, whose min-max range widens with more rows,
the most; the rest within 0.1%), its zstd sizes within 0.3% (``benchmarks/budget_overhead.py``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from flwr_splitms.codecs import Codec, Payload, get_codec
from flwr_splitms.codecs.ms import SIGN_FLAG
from flwr_splitms.codecs.registry import codec_class

__all__ = [
    "DOWNLINK",
    "UPLINK",
    "ZSTD_MARGIN",
    "ZSTD_MAX_GAIN",
    "BudgetError",
    "CodecChoice",
    "Decision",
    "Grid",
    "Measurement",
    "budget_nbytes",
    "candidates",
    "check_budget",
    "choose",
    "decide",
    "fit_to_budget",
    "measure",
    "smallest_feasible",
    "smallest_feasible_bits",
]

log = logging.getLogger("flwr")

ZSTD_MAX_GAIN = 4.0
"""A zstd setting is considered only if its size without the stage is at most this many times
the budget (zstd level 1 saves 55% on MS 0.99/2-bit sections of ReLU activations: 2.2x)."""

ZSTD_MARGIN = 0.02
"""Headroom of a zstd setting's estimated size below the budget (batch-to-batch variation)."""

_ZSTD = "zstd"
_KNOB = {"ms": "ratio", "sp": "ratio", "rt": "ratio", "qu": "bits"}
"""The precision knob of each codec family (see Pruning in the module docstring)."""


class BudgetError(ValueError):
    """A byte budget no codec setting can meet; the message names the smallest feasible one."""


# ---------------------------------------------------------------------------------------------
# One setting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecChoice:
    """A codec and the parameters the policy set (``get_codec(codec, **kwargs)`` builds it).

    ``label`` is its one-line form, e.g. ``"ms ratio=0.99 bits=2"`` (the history's
    ``codec_choice``); :meth:`parse` reads it back. Parameters are validated by the codec's own
    specs and kept in their declaration order; ``entropy="none"`` (the default) is dropped.
    """

    codec: str
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        specs = codec_class(self.codec).param_specs  # ValueError naming the codecs
        given = dict(self.params)
        if len(given) != len(self.params):
            raise ValueError(f"a parameter of {self.codec!r} is given twice: {self.params}")
        names = [s.name for s in specs]
        unknown = sorted(set(given) - set(names))
        if unknown:
            valid = ", ".join(names) or "(none)"
            raise ValueError(
                f"unknown parameter {unknown[0]!r} for codec {self.codec!r}; valid: {valid}"
            )
        ordered = tuple((s.name, s.validate(given[s.name])) for s in specs if s.name in given)
        ordered = tuple(p for p in ordered if p != ("entropy", "none"))
        object.__setattr__(self, "params", ordered)

    @classmethod
    def of(cls, codec: str, **params: Any) -> CodecChoice:
        """``CodecChoice.of("ms", ratio=0.99, bits=2)``."""
        return cls(codec, tuple(params.items()))

    @property
    def kwargs(self) -> dict[str, Any]:
        """The parameters as ``get_codec`` takes them."""
        return dict(self.params)

    def build(self) -> Codec:
        """The codec (cached per process)."""
        return _codec(self)

    @property
    def label(self) -> str:
        """``"ms ratio=0.99 bits=2"``, ``"ms ratio=0.98 bits=4 entropy=zstd"``, ``"qu bits=3"``."""
        return " ".join([self.codec, *(f"{k}={_show(v)}" for k, v in self.params)])

    @classmethod
    def parse(cls, label: str) -> CodecChoice:
        """The choice a :attr:`label` names; ValueError for a malformed one."""
        return _parse(str(label))

    def to_dict(self) -> dict[str, Any]:
        """Flat form for a ConfigRecord or a checkpoint: ``{"codec": "ms", "ratio": 0.99, ...}``."""
        return {"codec": self.codec, **self.kwargs}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CodecChoice:
        """Inverse of :meth:`to_dict`."""
        params = {k: v for k, v in data.items() if k != "codec"}
        if "codec" not in data:
            raise ValueError(f"a codec choice needs a 'codec' entry, got {dict(data)}")
        return cls.of(str(data["codec"]), **params)

    @property
    def fixed_size(self) -> bool:
        """Whether the message size depends on the shape only (no zstd stage)."""
        return self.kwargs.get("entropy", "none") != _ZSTD

    @property
    def without_entropy(self) -> CodecChoice:
        """The same setting without the zstd stage (the same decoded tensor, more bytes)."""
        return CodecChoice(self.codec, tuple(p for p in self.params if p[0] != "entropy"))

    def section_nbytes(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, signed: bool = False
    ) -> tuple[int, ...]:
        """Bytes of each data section before any entropy stage (``signed``: negative values)."""
        codec = self.without_entropy.build()
        sign = self.kwargs.get("signed", "auto")
        flags = (
            SIGN_FLAG if self.codec == "ms" and (sign is True or (sign == "auto" and signed)) else 0
        )
        return codec.expected_section_nbytes(tuple(int(s) for s in shape), dtype, flags)

    def wire_nbytes(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, signed: bool = False
    ) -> int:
        """``len(payload.to_bytes())`` for a tensor of ``shape``, header included, exactly.

        ``signed``: whether the tensor has negative values (MS then spends a sign bit). A
        zstd setting has no data-independent size: ValueError.
        """
        if not self.fixed_size:
            raise ValueError(f"{self.label}: the zstd stage makes the size depend on the data")
        return _header_nbytes(self, len(shape)) + sum(
            self.section_nbytes(shape, dtype, signed=signed)
        )


@functools.lru_cache(maxsize=512)
def _codec(choice: CodecChoice) -> Codec:
    return get_codec(choice.codec, **choice.kwargs)


@functools.lru_cache(maxsize=512)
def _header_nbytes(choice: CodecChoice, ndim: int) -> int:
    """Header bytes of ``choice`` for a tensor of ``ndim`` dims (constant per codec and rank)."""
    return choice.build().encode(torch.zeros((1,) * ndim)).header_nbytes


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _read(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@functools.lru_cache(maxsize=512)
def _parse(label: str) -> CodecChoice:
    codec, *tokens = label.split()
    params = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or not value:
            raise ValueError(
                f"codec choice {label!r}: {token!r} is not key=value; "
                "expected e.g. 'ms ratio=0.99 bits=2'"
            )
        params.append((key, _read(value)))
    return CodecChoice(codec, tuple(params))


# ---------------------------------------------------------------------------------------------
# The grid and the settings that fit
# ---------------------------------------------------------------------------------------------

RATIOS = (0.9, 0.925, 0.95, 0.95875, 0.97, 0.98, 0.985, 0.99, 0.9925, 0.995, 0.9975, 0.999)
"""Drop ratios of MS, SP and RT: 0.9 to 0.999, with the paper's 0.99 (MS) and 0.95875 (SP)."""


@dataclass(frozen=True)
class Grid:
    """The codec settings a budget policy chooses among.

    ``raw`` holds parameterless codecs (``bf16``: 16 bits, float32's range; ``none``: exact);
    ``fp16`` is left out because it refuses values beyond 65504, so a choice made on one
    batch could fail on the next. ``zstd``: also MS with the lossless zstd stage.

    RT is not in the default grid (``rt_ratios=()``): it sends SP's wire format for the same
    number k of values, but draws some of them outside the top k, and the top k are the k-subset
    with the least dropped norm, so RT's error is never below SP's at equal bytes and it could
    never be chosen. (Its point, gradient for non-top neurons, is not an error a probe measures.)
    """

    ms_ratios: tuple[float, ...] = RATIOS
    ms_bits: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    qu_bits: tuple[int, ...] = tuple(range(1, 17))
    sp_ratios: tuple[float, ...] = RATIOS
    rt_ratios: tuple[float, ...] = ()
    raw: tuple[str, ...] = ("bf16", "none")
    zstd: bool = True

    def settings(self) -> tuple[CodecChoice, ...]:
        """Every fixed-size setting, in a fixed order (MS, QU, SP, RT, raw)."""
        return _settings(self)

    def zstd_families(self) -> list[list[CodecChoice]]:
        """Per mask width, MS with the zstd stage, most values kept first (empty without zstd)."""
        if not self.zstd:
            return []
        return [
            [CodecChoice.of("ms", ratio=r, bits=b, entropy=_ZSTD) for r in sorted(self.ms_ratios)]
            for b in sorted(self.ms_bits)
        ]


@functools.lru_cache(maxsize=8)
def _settings(grid: Grid) -> tuple[CodecChoice, ...]:
    out = [CodecChoice.of("ms", ratio=r, bits=b) for b in grid.ms_bits for r in grid.ms_ratios]
    out += [CodecChoice.of("qu", bits=b) for b in grid.qu_bits]
    out += [CodecChoice.of("sp", ratio=r) for r in grid.sp_ratios]
    out += [CodecChoice.of("rt", ratio=r) for r in grid.rt_ratios]
    out += [CodecChoice.of(name) for name in grid.raw]
    return tuple(out)


UPLINK = Grid()
"""The activations' grid."""

DOWNLINK = Grid()
"""The gradients' grid: the same settings, sizes with MS's sign bit (gradients are signed). Of
the grad codecs (``codecs.downlink``) it holds those that are activation codecs (``none``,
``qu``, ``sp``, ``ms``, ``bf16``); not ``fp16`` or ``rt`` (see :class:`Grid`), nor ``mask``
(mask reuse): its size follows the uplink's support, not the budget, and its error on the raw
gradient overstates what the client loses (it drops only where the client's ReLU does)."""


def budget_nbytes(budget_bits: float, numel: int) -> int:
    """The most bytes one message of ``numel`` elements may take: ``floor(bits * numel / 8)``."""
    return math.floor(budget_bits * numel / 8)


def _usable(choice: CodecChoice, dtype: torch.dtype) -> bool:
    """16-bit formats only for float32 (``none`` already sends 16-bit inputs exactly)."""
    return not (choice.codec in ("bf16", "fp16") and dtype != torch.float32)


def candidates(
    shape: Sequence[int],
    dtype: torch.dtype,
    budget_bits: float,
    *,
    signed: bool = False,
    grid: Grid = UPLINK,
) -> list[CodecChoice]:
    """Every fixed-size setting of ``grid`` whose message for ``shape`` fits the budget.

    Sizes are exact, headers included (``CodecChoice.wire_nbytes``); ``signed`` says whether
    the tensor has negative values. zstd settings are found by :func:`measure` (their size
    depends on the data).
    """
    limit = budget_nbytes(budget_bits, math.prod(shape))
    return [
        c
        for c in grid.settings()
        if _usable(c, dtype) and c.wire_nbytes(shape, dtype, signed=signed) <= limit
    ]


def smallest_feasible(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    signed: bool = False,
    grid: Grid = UPLINK,
) -> tuple[float, CodecChoice]:
    """(bits per element, setting) of the cheapest fixed-size message for ``shape``."""
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"a budget per element needs a non-empty shape, got {tuple(shape)}")
    sizes = [
        (c.wire_nbytes(shape, dtype, signed=signed), i, c)
        for i, c in enumerate(grid.settings())
        if _usable(c, dtype)
    ]
    nbytes, _, choice = min(sizes)
    return nbytes * 8 / numel, choice


def smallest_feasible_bits(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    signed: bool = False,
    grid: Grid = UPLINK,
) -> float:
    """The smallest budget, bits per element with headers, some setting meets for ``shape``."""
    return smallest_feasible(shape, dtype, signed=signed, grid=grid)[0]


def check_budget(
    budget_bits: float,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    signed: bool = False,
    grid: Grid = UPLINK,
    key: str = "budget-bits",
    what: str = "activations",
) -> None:
    """BudgetError, one line naming the smallest feasible budget, unless some setting fits."""
    if not (
        isinstance(budget_bits, int | float) and math.isfinite(budget_bits) and budget_bits > 0
    ):
        raise BudgetError(f"{key}={budget_bits!r}: a budget must be a number of bits > 0")
    if candidates(shape, dtype, budget_bits, signed=signed, grid=grid):
        return
    raise BudgetError(_infeasible(budget_bits, shape, dtype, signed, grid, key, what))


def _infeasible(
    budget_bits: float,
    shape: Sequence[int],
    dtype: torch.dtype,
    signed: bool,
    grid: Grid,
    key: str,
    what: str,
) -> str:
    bits, choice = smallest_feasible(shape, dtype, signed=signed, grid=grid)
    need = math.ceil(bits * 1e4) / 1e4  # rounded up, so that it does fit
    return (
        f"{key}={budget_bits:g} is below the smallest feasible budget {need:g} bits/element "
        f"for {what} of shape {tuple(shape)} ({choice.label} with headers); raise {key} to "
        f"at least {need:g}"
    )


# ---------------------------------------------------------------------------------------------
# Measuring, choosing, guarding
# ---------------------------------------------------------------------------------------------


class Measurement(NamedTuple):
    """One setting measured on one client's tensor."""

    error: float  # relative error ||x - x_hat|| / ||x|| on the sample
    nbytes: int  # message bytes for the whole tensor, header included (zstd: estimated)


def _family(choice: CodecChoice) -> tuple[Any, ...]:
    knob = _KNOB.get(choice.codec)
    return (choice.codec, *(p for p in choice.params if p[0] != knob))


def _most_precise(
    choices: Iterable[CodecChoice], shape: Sequence[int], dtype: torch.dtype, signed: bool
) -> list[CodecChoice]:
    """The largest setting of each family (ties: the first), in first-seen family order."""
    best: dict[tuple[Any, ...], tuple[int, CodecChoice]] = {}
    for c in choices:
        size = c.wire_nbytes(shape, dtype, signed=signed)
        fam = _family(c)
        if fam not in best or size > best[fam][0]:
            best[fam] = (size, c)
    return [c for _, c in best.values()]


def _sample(x: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows (dim 0) of a batched tensor; the whole of a 0-d or 1-d one."""
    if rows < 1:
        raise ValueError(f"sample must be >= 1 rows, got {rows}")
    return x[:rows] if x.dim() >= 2 else x


def _measure_one(codec: Codec, x: torch.Tensor) -> tuple[Payload, float]:
    # A fixed seed: RT's draw (and so its error) is the same at every client and every call.
    return codec.encode_measured(x, generator=torch.Generator().manual_seed(0), train=True)


def measure(
    x: torch.Tensor,
    budget_bits: float,
    *,
    sample: int,
    grid: Grid = UPLINK,
) -> dict[str, Measurement]:
    """``{label: Measurement}`` of the settings that fit the budget for ``x`` (any shape).

    Encodes the first ``sample`` rows of ``x`` with the most precise fitting setting of each
    family (``encode_measured``: the error comes out of the encoder, no second decode), and
    searches MS with the zstd stage per mask width (two encodes at most each). Raises
    BudgetError when nothing fits. Works on activations (client) and gradients (server).
    """
    shape, dtype = tuple(x.shape), x.dtype
    signed = bool(x.numel() and x.detach().amin() < 0)
    fitting = candidates(shape, dtype, budget_bits, signed=signed, grid=grid)
    if not fitting:
        raise BudgetError(
            _infeasible(budget_bits, shape, dtype, signed, grid, "budget", "a tensor")
        )
    part = _sample(x.detach(), sample)
    out = {}
    for choice in _most_precise(fitting, shape, dtype, signed):
        _, error = _measure_one(choice.build(), part)
        out[choice.label] = Measurement(error, choice.wire_nbytes(shape, dtype, signed=signed))
    limit = budget_nbytes(budget_bits, math.prod(shape))
    for family in grid.zstd_families():  # mask widths in ascending order
        found = _zstd_search(family, part, shape, dtype, signed, limit)
        if found is False:
            break  # a wider mask compresses to more bytes still
        if found is not None:
            out[found[0].label] = found[1]
    return out


def _zstd_estimate(
    choice: CodecChoice,
    part: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    signed: bool,
) -> tuple[Measurement, list[float]]:
    """Encode the sample with a zstd setting: its error, the whole tensor's estimated size, and
    each section's compression factor."""
    payload, error = _measure_one(choice.build(), part)
    raw = choice.section_nbytes(part.shape, dtype, signed=bool(payload.flags & SIGN_FLAG))
    factors = [len(z) / r if r else 1.0 for z, r in zip(payload.sections, raw, strict=True)]
    return Measurement(error, _predict(choice, factors, shape, dtype, signed)), factors


def _predict(
    choice: CodecChoice,
    factors: Sequence[float],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    signed: bool,
) -> int:
    full = choice.section_nbytes(shape, dtype, signed=signed)
    body = sum(math.ceil(f * n) for f, n in zip(factors, full, strict=True))
    return _header_nbytes(choice.without_entropy, len(shape)) + body


def _zstd_search(
    family: Sequence[CodecChoice],
    part: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    signed: bool,
    limit: int,
) -> tuple[CodecChoice, Measurement] | Literal[False] | None:
    """The most precise zstd setting of one MS family estimated to fit; None if the family has
    no prospect or none fits, False if even the family's least precise setting is over budget.

    Prospects: settings whose twin without the stage does not fit (else the twin, same error,
    is measured already) and is at most ``ZSTD_MAX_GAIN`` times the budget. The least precise
    is encoded first: if it does not fit, none does (and if it is the family's largest ratio,
    no wider mask fits either: same values, codes with at least as much information, so
    :func:`measure` stops there); its compression factors
    then predict which more precise setting fits, and that one is encoded to confirm.
    """
    cap = math.floor(limit * (1.0 - ZSTD_MARGIN))
    prospects = [
        c
        for c in family
        if limit
        < c.without_entropy.wire_nbytes(shape, dtype, signed=signed)
        <= ZSTD_MAX_GAIN * limit
    ]
    if not prospects:
        return None
    first = prospects[-1]
    found, factors = _zstd_estimate(first, part, shape, dtype, signed)
    if found.nbytes > cap:
        return False if first == family[-1] else None
    for choice in prospects[:-1]:  # most precise first
        if _predict(choice, factors, shape, dtype, signed) <= cap:
            better, _ = _zstd_estimate(choice, part, shape, dtype, signed)
            if better.nbytes <= cap:
                return choice, better
            break
    return first, found


def choose(
    measurements: Sequence[Mapping[str, Measurement | Sequence[float]]],
    *,
    fixed_size: bool = False,
) -> CodecChoice:
    """The setting with the least mean relative error over the clients' measurements.

    Only labels every client measured count (a zstd setting may fit at one client and not at
    another); ``fixed_size`` keeps settings without the zstd stage only. Ties: fewer bytes
    (the most at any client), then the label. Deterministic and independent of the clients'
    order (``math.fsum``). BudgetError when no setting is common to all.
    """
    if not measurements:
        raise ValueError("choose needs the measurements of at least one client")
    common = set.intersection(*(set(m) for m in measurements))
    if fixed_size:
        common = {label for label in common if CodecChoice.parse(label).fixed_size}
    if not common:
        raise BudgetError(
            "no codec setting fits the budget at every client (their tensors differ in shape "
            "or sign); raise the budget"
        )

    def rank(label: str) -> tuple[float, int, str]:
        rows = [Measurement(*m[label]) for m in measurements]
        error = math.fsum(r.error for r in rows) / len(rows)
        return error, max(int(r.nbytes) for r in rows), label

    return CodecChoice.parse(min(common, key=rank))


class Decision(NamedTuple):
    """What the server sends for a round, and what the history records."""

    choice: CodecChoice  # the setting every client encodes with
    fallback: CodecChoice  # the least-error fixed-size setting: the guard's re-encoding
    error: float  # mean relative error of ``choice`` over the clients' samples
    nbytes: int  # the largest message of ``choice`` at any client (estimated for zstd)


def decide(
    measurements: Sequence[Mapping[str, Measurement | Sequence[float]]],
    *,
    fixed_size: bool = False,
) -> Decision:
    """:func:`choose`, its fixed-size fallback, and the chosen setting's error and bytes
    (``fixed_size``: settings without the zstd stage only; the fallback is then the choice)."""
    choice = choose(measurements, fixed_size=fixed_size)
    fallback = choice if choice.fixed_size else choose(measurements, fixed_size=True)
    rows = [Measurement(*m[choice.label]) for m in measurements]
    error = math.fsum(r.error for r in rows) / len(rows)
    return Decision(choice, fallback, error, max(int(r.nbytes) for r in rows))


def fit_to_budget(
    payload: Payload,
    error: float,
    x: torch.Tensor,
    budget_bits: float,
    fallback: CodecChoice,
    *,
    generator: torch.Generator | None = None,
    measure_error: bool = True,
    grid: Grid = UPLINK,
) -> tuple[Payload, float]:
    """``(payload, error)`` unchanged when its message fits the budget, else ``x`` re-encoded.

    Call it after encoding ``x`` (to ``payload``, with relative ``error``). Over budget, ``x``
    is encoded with ``fallback`` (a fixed-size setting, :attr:`Decision.fallback`) if that
    fits, else with the largest fitting fixed-size setting of ``grid`` (``x`` may have a sign
    the probe did not see); the error is then measured again (NaN without
    ``measure_error``). A re-encoded payload is a new object (``result is not payload``). The
    receiver decodes by the header (``decode_bytes``), so it needs no notice.
    """
    limit = budget_nbytes(budget_bits, x.numel())
    if payload.nbytes + payload.header_nbytes <= limit:
        return payload, error
    shape, dtype = tuple(x.shape), x.dtype
    signed = bool(x.numel() and x.detach().amin() < 0)
    fitting = candidates(shape, dtype, budget_bits, signed=signed, grid=grid)
    if not fitting:
        raise BudgetError(
            _infeasible(budget_bits, shape, dtype, signed, grid, "budget", "a tensor")
        )
    ordered = sorted(
        _most_precise(fitting, shape, dtype, signed),
        key=lambda c: -c.wire_nbytes(shape, dtype, signed=signed),
    )
    if fallback.fixed_size and fallback.wire_nbytes(shape, dtype, signed=signed) <= limit:
        ordered.insert(0, fallback)
    choice = ordered[0]
    codec = choice.build()
    log.debug(
        "budget: a %d-byte %s message exceeds the %d-byte budget; re-encoded with %s",
        payload.nbytes + payload.header_nbytes,
        payload.codec,
        limit,
        choice.label,
    )
    if measure_error:
        return codec.encode_measured(x, generator=generator, train=True)
    return codec.encode(x, generator=generator, train=True), math.nan
