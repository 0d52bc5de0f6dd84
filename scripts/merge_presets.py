"""Combine run-config presets from ``strategies/`` for one ``flwr run``.

flwr 1.41 takes a single TOML file per ``--run-config`` and refuses a second one ("TOML files
cannot be passed alongside key-value pairs"), so presets cannot be stacked directly. This script
merges several (later files win) and prints them as ``key=value`` pairs, which ``--run-config``
does accept::

    flwr run examples/cifar100_resnet18 \\
        --run-config "$(python scripts/merge_presets.py strategies/sp.toml strategies/deep.toml)"

or writes one TOML file with ``-o merged.toml`` (then ``--run-config merged.toml``). Extra
``key=value`` arguments are merged last (``num-server-rounds=50``, ``codec=sp``: strings may be
left unquoted here; the output quotes them as Flower needs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from flwr_splitms.config.overrides import parse_pairs


def merge(items: list[str]) -> dict[str, Any]:
    """Merge preset files and ``key=value`` overrides, in order (later wins).

    An override's value is read as TOML (``codec="ms"``, ``batch-size=32``); an unquoted word is
    taken as a string (``codec=ms``), since the output quotes it for Flower anyway.
    """
    merged: dict[str, Any] = {}
    for item in items:
        if item.endswith(".toml"):
            try:
                with Path(item).open("rb") as handle:
                    data = tomllib.load(handle)
            except OSError as e:
                raise SystemExit(f"{item}: cannot read the preset ({e.strerror})") from None
            except tomllib.TOMLDecodeError as e:
                raise SystemExit(f"{item}: not valid TOML ({e})") from None
        elif "=" in item:
            data, problems = parse_pairs([item], bare_strings=True)
            if problems:
                raise SystemExit("\n".join(problems))
        else:
            raise SystemExit(f"not a .toml preset or key=value pair: {item!r}")
        for key, value in data.items():
            if isinstance(value, dict):
                raise SystemExit(f"{item}: presets are flat; {key!r} is a table")
            merged[key] = value
    return merged


def to_toml_value(value: Any) -> str:
    """A TOML literal for a flat run-config value (bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "'" in value or '"' in value or " " in value:
            raise SystemExit(f"values with quotes or spaces are not supported: {value!r}")
        return json.dumps(value)
    raise SystemExit(f"unsupported run-config value {value!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="+", help="preset .toml files and/or key=value overrides")
    parser.add_argument("-o", "--output", help="write one TOML file instead of key=value pairs")
    args = parser.parse_args(argv)
    merged = merge(args.items)
    if args.output:
        text = "".join(f"{key} = {to_toml_value(value)}\n" for key, value in merged.items())
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(" ".join(f"{k}={to_toml_value(v)}" for k, v in merged.items()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
