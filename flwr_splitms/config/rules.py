"""What each run-config value may be, and the one-line problem reports when it is not.

A rule is attached to a :class:`~flwr_splitms.config.SplitConfig` field (``metadata["rule"]``),
so the field's default, type and allowed values live in one place. Every problem line names the
key, the value, what is allowed and the closest valid value, so that a user can fix it without
reading the code.
"""

from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Choices", "NonEmpty", "Range", "Rule", "closest", "show"]


def show(value: object) -> str:
    """A value as a run-config (TOML) literal: ``"ms"``, ``true``, ``0.99``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def closest(word: str, choices: Sequence[str]) -> str | None:
    """The choice most like ``word`` (difflib), or None when nothing is close."""
    found = difflib.get_close_matches(str(word).strip().lower(), list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


class Rule(ABC):
    """A check of one (already type-correct) value; ``problem`` returns None when it is valid."""

    @abstractmethod
    def problem(self, key: str, value: object) -> str | None:
        """One line naming the problem, what is allowed and the closest valid value; or None."""


@dataclass(frozen=True)
class Range(Rule):
    """A number between bounds (None = unbounded); open bounds exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return f"a finite {kind[2:].lstrip()}"

    def problem(self, key: str, value: object) -> str | None:
        v = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(v)
        if ok and self.low is not None:
            ok = v > self.low if self.low_open else v >= self.low
        if ok and self.high is not None:
            ok = v < self.high if self.high_open else v <= self.high
        if ok:
            return None
        line = f"{key}={show(value)}: must be {self.describe()}"
        fix = self._nearest(v)
        return line + (f"; closest valid: {key}={show(fix)}" if fix is not None else "")

    def _nearest(self, v: float) -> float | int | None:
        """The closest allowed value when a closed bound is crossed (None for open bounds)."""
        if self.low is not None and (not math.isfinite(v) or v < self.low) and not self.low_open:
            bound: float = self.low
        elif self.high is not None and (v > self.high or v == math.inf) and not self.high_open:
            bound = self.high
        else:
            return None
        return int(bound) if self.integer else float(bound)


@dataclass(frozen=True)
class Choices(Rule):
    """One of a set of names that another module owns (read when checked, so never stale)."""

    names: Callable[[], Sequence[str]]
    what: str = "value"

    def problem(self, key: str, value: object) -> str | None:
        names = list(self.names())
        if value in names:
            return None
        line = f"{key}={show(value)}: unknown {self.what}; allowed: {', '.join(names)}"
        near = closest(str(value), names)
        return line + (f"; did you mean {key}={show(near)}?" if near else "")


@dataclass(frozen=True)
class NonEmpty(Rule):
    """A string that is not blank (paths, names)."""

    example: str

    def problem(self, key: str, value: object) -> str | None:
        if str(value).strip():
            return None
        return f"{key}={show(value)}: must not be empty; e.g. {key}={show(self.example)}"
