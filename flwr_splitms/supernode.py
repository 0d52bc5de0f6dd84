"""Flower's SuperNode, tuned for split learning's one message per node and step.

``flwr-splitms-supernode`` takes every ``flower-supernode`` option and runs Flower's own
SuperNode with two changes, both to fixed costs that Flower 1.42 pays per message:

* its idle poll: after a pull that found no message the SuperNode sleeps 3 s, and while its
  ClientApp works it checks for the reply every 0.5 s. In split learning the node's next message
  is ready about one server step after its reply, so most steps wait out most of those 3 s.
  ``--poll`` (default 0.2 s) bounds both sleeps; the price is more pull requests to the SuperLink
  while the node is idle (1 / poll per second, each a small HTTP request).
* its SuperExec: with the default ``--isolation subprocess`` the node starts
  ``flwr-splitms-superexec`` (ClientApp tasks forked from a template that imported torch, Flower
  and flwr-splitms once) instead of ``flower-superexec`` (a new process per message).
  ``--flower-superexec`` keeps Flower's.

Flower has no option for either, so this module replaces two names (``time`` and ``subprocess``)
in the globals of Flower's SuperNode loop module for its own process (reached through
:mod:`flwr_splitms.flower_internals`, which refuses a Flower version CI does not test);
everything else is Flower's code, unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from flwr_splitms import flower_internals

DEFAULT_POLL = 0.2


class _Override:
    """A module whose attributes are the original's, except those given."""

    def __init__(self, module: ModuleType, **overrides: Any) -> None:
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def bounded_sleep(poll: float) -> Any:
    """``time.sleep`` that never sleeps longer than ``poll`` seconds."""

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, poll))

    return sleep


def warm_superexec_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` that starts ``flwr-splitms-superexec`` where Flower starts its own."""
    command = args[0] if args else kwargs.pop("args")
    if isinstance(command, list | tuple) and command and command[0] == "flower-superexec":
        command = [sys.executable, "-m", "flwr_splitms.superexec", *command[1:]]
    return subprocess.Popen(command, *args[1:], **kwargs)


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="flwr-splitms-supernode",
        description="Flower's SuperNode with a short idle poll and, in subprocess isolation, "
        "flwr-splitms-superexec as its SuperExec. Every other option is flower-supernode's "
        "(see `flower-supernode --help`).",
        add_help=False,
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=DEFAULT_POLL,
        help=f"longest sleep, in seconds, between the node's pulls and reply checks "
        f"(Flower: 3 and 0.5; default {DEFAULT_POLL})",
    )
    parser.add_argument(
        "--flower-superexec",
        action="store_true",
        help="start Flower's flower-superexec (a new process per message) instead",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        raise SystemExit(0)
    if not 0.01 <= args.poll <= 3.0:
        parser.error(f"--poll must be between 0.01 and 3 seconds, got {args.poll}")
    return args, rest


def _check_warm_superexec() -> None:
    """SystemExit, naming the fix, where flwr-splitms-superexec could not run here.

    Checked before the node starts: a SuperExec that exits at once would leave the node
    registered but never answering.
    """
    from flwr_splitms.superexec import DEFAULT_PRELOAD, flower_superexec_loop

    try:
        flower_superexec_loop()
    except SystemExit as err:
        raise SystemExit(f"{err.code}; or start the node with --flower-superexec") from None
    missing = [name for name in DEFAULT_PRELOAD if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"flwr-splitms-supernode: {', '.join(missing)} not installed in this environment "
            "(the forking SuperExec preloads them); install them or use --flower-superexec"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``flwr-splitms-supernode``."""
    args, rest = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        node: Any = flower_internals.supernode_loop()  # its globals are replaced below
        flower_supernode = flower_internals.flower_supernode()
    except flower_internals.UnsupportedFlowerError as err:
        raise SystemExit(f"flwr-splitms-supernode: {err}") from err
    if not args.flower_superexec:
        _check_warm_superexec()
        node.subprocess = _Override(subprocess, Popen=warm_superexec_popen)
    node.time = _Override(time, sleep=bounded_sleep(args.poll))
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
