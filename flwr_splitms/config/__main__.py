"""Check a run-config without Flower: ``python -m flwr_splitms.config "key=value ..."``.

Besides every key and value, it checks what can be known without building the run: that the
device exists on this machine, and that ``batch-size`` fits the smallest client partition when
the dataset's size is known without its files (the synthetic set, and the fixed training splits
of CIFAR and MNIST). The last line says what it could not check.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from flwr_splitms.core.schedule import describe_lr

from .overrides import parse_pairs
from .record import ConfigError, SplitConfig, validate
from .rules import show

EPILOG = """\
Flower rejects a run-config key that the app does not declare before the app runs, and says
only "Invalid run configuration" (the key is named in the SuperLink's log). Run this first: it
names every unknown key with the closest valid one, and every bad value with what is allowed.

It also checks, on THIS machine, that the device exists (the machines of a deployment's
SuperLink and SuperNodes may differ: check there, or pass --no-device-check), and that batch-size
fits the smallest client partition when the dataset's size is known without its files (synthetic,
CIFAR-10/100, MNIST, Fashion-MNIST), for --nodes SuperNodes (default: min-nodes). The last line
lists what it cannot check.

examples:
  python -m flwr_splitms.config 'codec="qu" codec-bits=4 steps-per-round=20'
  python -m flwr_splitms.config --app examples/cifar100_resnet18 --file strategies/sp.toml
  python -m flwr_splitms.config --nodes 10 'dataset="synthetic" batch-size=64'
  python -m flwr_splitms.config --keys

exit status: 0 when the run-config is valid (prints OK and the effective settings), 1 otherwise
(prints one line per problem).
"""

# Training examples per class of the datasets whose training split is fixed (torchvision's).
# Partition sizes depend only on these counts (IID: on their sum; Dirichlet: the draws depend on
# how many examples each class has, not which), so they are exact without the files.
TRAIN_CLASS_COUNTS: dict[str, tuple[int, ...]] = {
    "cifar10": (5000,) * 10,
    "cifar100": (500,) * 100,
    "fashion-mnist": (6000,) * 10,
    "mnist": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
}


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


def class_counts(config: SplitConfig) -> tuple[int, ...] | None:
    """Training examples per class, when known without the dataset's files (else None)."""
    if config.dataset == "synthetic":
        from flwr_splitms.data import dataset_num_classes

        classes = dataset_num_classes("synthetic", config.num_classes or None)
        n = config.synthetic_size  # labels are arange(n) % classes, shuffled
        return tuple(n // classes + (1 if c < n % classes else 0) for c in range(classes))
    return TRAIN_CLASS_COUNTS.get(config.dataset)


def partition_sizes(config: SplitConfig, nodes: int) -> list[int] | None:
    """Training examples of each of ``nodes`` client partitions, as the run will cut them.

    None when the dataset's size is not known without loading it (ImageNet, a user's data).
    Raises ValueError when there are more partitions than examples.
    """
    from flwr_splitms.data import partition

    counts = class_counts(config)
    if counts is None:
        return None
    labels = np.repeat(np.arange(len(counts)), counts)
    parts = partition(labels, nodes, config.partition, config.dirichlet_alpha, config.seed)
    return [len(p) for p in parts]


def device_problems(config: SplitConfig) -> tuple[list[str], list[str]]:
    """(problems, notes) of ``device`` on THIS machine (a deployment's machines may differ)."""
    from flwr_splitms.devices import resolve_device

    try:
        found = resolve_device(config.device)
    except ValueError as err:
        return [
            f"device={show(config.device)}: {err}; this checks THIS machine: for a deployment "
            "whose nodes have the device, check there or pass --no-device-check"
        ], []
    return [], [
        f"# device={show(config.device)} is {found} on this machine "
        "(a deployment's SuperLink and SuperNode machines may differ)"
    ]


def partition_problems(
    config: SplitConfig, run_config: dict[str, Any], nodes: int
) -> tuple[list[str], list[str]]:
    """(problems, notes) of ``nodes`` against min-nodes and of batch-size against the partitions."""
    problems = []
    if nodes < config.min_nodes:
        problems.append(
            f"--nodes {nodes}: fewer than min-nodes={config.min_nodes}; the run waits "
            f"node-wait={config.node_wait:g}s for {config.min_nodes} nodes, then stops: start "
            f'{config.min_nodes} SuperNodes (simulation: --federation-config "num-supernodes='
            f'{config.min_nodes}"), or set min-nodes={nodes}'
        )
    try:
        sizes = partition_sizes(config, nodes)
    except ValueError as err:
        return [*problems, f"--nodes {nodes}: {err}"], []
    if sizes is None:
        return problems, []
    problems += validate(run_config, partition_sizes=sizes)
    if problems:
        return problems, []
    return [], [
        f"# batch-size {config.batch_size} fits every client: the smallest of {nodes} "
        f"{config.partition} partitions of {config.dataset} holds {min(sizes)} training examples"
    ]


def lr_note(config: SplitConfig) -> str:
    """The rate the run trains at: ``lr`` is given at batch 64 and scaled by ``lr-scaling``."""
    ramp = f", reached after a {config.warmup_steps}-step warmup" if config.warmup_steps else ""
    return f"# {describe_lr(config.lr, config.batch_size, config.lr_scaling)}{ramp}"


def not_checked(config: SplitConfig, nodes_given: bool) -> str:
    """The final line: what cannot be known without the run's data and machines."""
    items = []
    if config.dataset != "synthetic":
        fetch = " or can be downloaded there" if config.data_download else ""
        items.append(f"that {config.dataset} is in data-root {config.data_root}{fetch}")
    if class_counts(config) is None:
        items.append(f"batch-size against the partitions of {config.dataset} (sized once loaded)")
    items.append("the devices and memory of the SuperLink's and SuperNodes' machines")
    given = "" if nodes_given else f" (assumed: min-nodes={config.min_nodes}; give --nodes N)"
    items.append(f"how many SuperNodes connect{given}")
    return "# not checked: " + "; ".join(items)


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
    parser.add_argument(
        "--nodes",
        type=int,
        help="SuperNodes of the run (num-supernodes in simulation), one partition each; "
        "default: min-nodes",
    )
    parser.add_argument(
        "--no-device-check",
        action="store_true",
        help="skip the device check (the run-config is for another machine)",
    )
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
    if args.nodes is not None and args.nodes < 1:
        problems.append(f"--nodes {args.nodes}: must be >= 1 (the number of SuperNodes)")
    config: SplitConfig | None = None
    try:
        config = SplitConfig.from_run_config(run_config)
    except ConfigError as e:
        problems += e.problems
    notes: list[str] = []
    if config is not None and not problems:
        for found, said in (
            ([], []) if args.no_device_check else device_problems(config),
            partition_problems(config, run_config, args.nodes or config.min_nodes),
        ):
            problems += found
            notes += said
    if problems or config is None:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print("OK")
    print("\n".join(effective_lines(config)))
    for key in config.unused_keys():
        print(f"# note: {key} is set but codec {config.codec!r} does not use it")
    print(lr_note(config))
    for line in notes:
        print(line)
    print(not_checked(config, args.nodes is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
