"""``key=value`` run-config overrides, parsed as ``flwr run --run-config`` parses them.

Flower reads each value as TOML, so strings need double quotes inside the shell's single
quotes: ``--run-config 'codec="ms" batch-size=32'``. :func:`parse_pairs` follows the same
rules and, instead of Flower's generic "invalid format", says which pair is wrong and how to
write it; ``bare_strings=True`` takes an unquoted word as a string (for tools that re-quote).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from typing import Any

__all__ = ["PAIR", "parse_pairs"]

# Flower's own pattern (flwr.common.config.parse_config_args): key=value, value maybe quoted.
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_pairs(
    items: Iterable[str], *, bare_strings: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Parse ``key=value`` strings into a flat dict; also return one problem line per bad item."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        matched = False
        for m in PAIR.finditer(item):
            matched = True
            key, raw = m.group(1), m.group(2)
            try:
                parsed = tomllib.loads(f"{key} = {raw}")
            except tomllib.TOMLDecodeError:
                bare = re.fullmatch(r"[A-Za-z_][\w.:/~+-]*", raw) is not None
                if bare_strings and bare:
                    values[key] = raw
                    continue
                quoted = "'" in raw or '"' in raw
                fix = f'{key}=<true, 3, 0.5 or "text">' if quoted else f'{key}="{raw}"'
                problems.append(
                    f"{key}={raw}: not a TOML value; strings need double quotes, and the whole "
                    f"list single quotes in the shell: --run-config '{fix}'"
                )
                continue
            values.update(parsed)
        leftover = PAIR.sub("", item).strip()
        if leftover or not matched:
            problems.append(f"{leftover or item!r}: not a key=value pair (e.g. batch-size=32)")
    return values, problems
