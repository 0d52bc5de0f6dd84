"""Codec parameters: validation with helpful messages, and a fixed-size binary wire form.

Every codec declares its parameters as a tuple of specs. The same specs validate what a user
passes to ``get_codec`` and pack/unpack the parameters in a payload header, so a header can
never describe a codec that ``get_codec`` would refuse.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["Choice", "FloatRange", "IntRange", "Param"]


class Param(ABC):
    """One named codec parameter."""

    name: str
    default: object

    @property
    @abstractmethod
    def wire_format(self) -> str:
        """``struct`` format character of the parameter in a payload header."""

    @abstractmethod
    def validate(self, value: object) -> object:
        """Return the normalized value, or raise ValueError saying what is allowed."""

    @abstractmethod
    def to_wire(self, value: object) -> int | float:
        """Map a validated value to the number stored in the header."""

    @abstractmethod
    def from_wire(self, raw: int | float) -> object:
        """Inverse of ``to_wire``; raises ValueError for numbers no valid value maps to."""


@dataclass(frozen=True)
class FloatRange(Param):
    """A real number in an interval, stored as a float64."""

    name: str
    default: float
    low: float
    high: float
    low_closed: bool = False
    high_closed: bool = False

    @property
    def wire_format(self) -> str:
        return "d"

    def _interval(self) -> str:
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def validate(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{self.name} must be a number in {self._interval()}, got {value!r}")
        v = float(value)
        above = v >= self.low if self.low_closed else v > self.low
        below = v <= self.high if self.high_closed else v < self.high
        if not (math.isfinite(v) and above and below):
            raise ValueError(f"{self.name} must be in {self._interval()}, got {value!r}")
        return v

    def to_wire(self, value: object) -> float:
        return float(value)  # type: ignore[arg-type]

    def from_wire(self, raw: int | float) -> float:
        return self.validate(raw)


@dataclass(frozen=True)
class IntRange(Param):
    """An integer in a closed interval, stored as an unsigned 8- or 16-bit integer."""

    name: str
    default: int
    low: int
    high: int

    @property
    def wire_format(self) -> str:
        return "B" if self.high <= 0xFF else "H"

    def validate(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"{self.name} must be an integer in {self.low}..{self.high}, got {value!r}"
            )
        v = int(value)
        if not self.low <= v <= self.high:
            raise ValueError(f"{self.name} must be in {self.low}..{self.high}, got {value!r}")
        return v

    def to_wire(self, value: object) -> int:
        return int(value)  # type: ignore[call-overload]

    def from_wire(self, raw: int | float) -> int:
        return self.validate(raw)


@dataclass(frozen=True)
class Choice(Param):
    """One of a few fixed values (strings or booleans), stored as its index."""

    name: str
    default: object
    choices: tuple[object, ...]

    @property
    def wire_format(self) -> str:
        return "B"

    def _index(self, value: object) -> int | None:
        # Compare type and value, so that 1 is not taken for True nor 0 for False.
        for i, c in enumerate(self.choices):
            if type(value) is type(c) and value == c:
                return i
        return None

    def validate(self, value: object) -> object:
        i = self._index(value)
        if i is None:
            allowed = ", ".join(repr(c) for c in self.choices)
            raise ValueError(f"{self.name} must be one of {allowed}; got {value!r}")
        return self.choices[i]

    def to_wire(self, value: object) -> int:
        i = self._index(value)
        assert i is not None, "to_wire takes validated values"
        return i

    def from_wire(self, raw: int | float) -> object:
        if not isinstance(raw, int) or not 0 <= raw < len(self.choices):
            raise ValueError(f"{self.name}: no choice has wire index {raw!r}")
        return self.choices[raw]
