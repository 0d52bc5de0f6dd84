"""Check a run-config without Flower: ``python -m flwr_splitms.config "key=value ..."``."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from .overrides import parse_pairs
from .record import ConfigError, SplitConfig
from .rules import show

EPILOG = """\
Flower rejects a run-config key that the app does not declare before the app runs, and says
only "Invalid run configuration" (the key is named in the SuperLink's log). Run this first: it
names every unknown key with the closest valid one, and every bad value with what is allowed.

examples:
  python -m flwr_splitms.config 'codec="qu" codec-bits=4 steps-per-round=20'
  python -m flwr_splitms.config --app examples/cifar100_resnet18 --file strategies/sp.toml
  python -m flwr_splitms.config --keys

exit status: 0 when the run-config is valid (prints OK and the effective settings), 1 otherwise
(prints one line per problem).
"""


def _load_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        return tomllib.load(handle)


def app_config(app: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of a Flower app (its defaults)."""
    pyproject = app / "pyproject.toml" if app.is_dir() else app
    table = _load_toml(pyproject).get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(table, dict):
        raise SystemExit(f"{pyproject}: no [tool.flwr.app.config] table")
    return table


def effective_lines(config: SplitConfig) -> list[str]:
    """``key = value`` lines of every setting; codec parameters show the value the run uses."""
    used = {f"codec-{k}": v for k, v in config.codec_params.items()}
    used |= {f"grad-codec-{k}": v for k, v in config.grad_codec_params.items()}
    lines = []
    for key, value in config.to_run_config().items():
        if value == "" and key in used:
            lines.append(f"{key} = {show(used[key])}  # the codec's default")
        elif value != "" or key not in used:
            lines.append(f"{key} = {show(value)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flwr_splitms.config",
        description="Check a flwr-splitms run-config (the value of flwr run --run-config).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pairs", nargs="*", help="key=value pairs, as for flwr run --run-config")
    parser.add_argument("--file", type=Path, action="append", default=[], help="a preset .toml")
    parser.add_argument("--app", type=Path, help="start from this Flower app's run-config")
    parser.add_argument("--keys", action="store_true", help="list the valid keys and exit")
    args = parser.parse_args(argv)
    if args.keys:
        print("\n".join(SplitConfig.keys()))
        return 0

    problems: list[str] = []
    run_config: dict[str, Any] = dict(app_config(args.app)) if args.app else {}
    declared = set(run_config)
    for path in args.file:
        try:
            run_config.update(_load_toml(path))
        except (OSError, tomllib.TOMLDecodeError) as e:
            problems.append(f"{path}: {e}")
    pairs, bad = parse_pairs(args.pairs)
    problems += bad
    run_config.update(pairs)
    if args.app:
        known = set(SplitConfig.keys())
        problems += [
            f"{key}: not declared in {args.app}'s [tool.flwr.app.config]; flwr run refuses it"
            for key in run_config
            if key not in declared and key in known
        ]
    try:
        config = SplitConfig.from_run_config(run_config)
    except ConfigError as e:
        problems += e.problems
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print("OK")
    print("\n".join(effective_lines(config)))
    for key in config.unused_keys():
        print(f"# note: {key} is set but codec {config.codec!r} does not use it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
