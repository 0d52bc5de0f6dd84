"""The non-public Flower surface flwr-splitms relies on, behind one version check.

Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, the top-level names
of ``flwr.serverapp.strategy``, ``flwr.simulation``) is all the ClientApp and most of the
strategy need. A few things have no public form, and this module is the only place that reaches
for them:

- :func:`sample_nodes`: ``flwr.serverapp.strategy.strategy_utils.sample_nodes``;
- :func:`superexec_loop`: ``flwr.supercore.superexec.run_superexec`` (``flwr-splitms-superexec``
  replaces its ``get_executor`` and runs its ``run_superexec``);
- :func:`subprocess_executor`, :func:`task_command`, :func:`launch_accepted`,
  :func:`load_superexec_auth_secret`: Flower's executor, task commands, launch result and
  SuperExec secret (``flwr.supercore``);
- :func:`clientapp_entry_point`: ``flwr.supernode.cli.flwr_clientapp.flwr_clientapp``, the
  ``flwr-clientapp`` command that forked tasks run;
- :func:`supernode_loop`: ``flwr.supernode.start_client_internal`` (``flwr-splitms-supernode``
  replaces its ``time`` and ``subprocess`` globals);
- :func:`flower_supernode`: ``flwr.supernode.cli.flower_supernode.flower_supernode``.

Such names move between Flower releases without notice, so every accessor first checks that the
installed Flower is one of :data:`TESTED_FLOWER` (once per process) and raises
:class:`UnsupportedFlowerError`, naming the installed and tested versions and the fix, on any
other; a name missing even on a tested version raises the same error. :data:`FLOWER_REQUIREMENT`
is the dependency line of ``pyproject.toml`` and of the example apps, derived from
:data:`TESTED_FLOWER` (``tests/test_flower_internals.py`` checks they agree), so what pip installs
is what CI tests. Importing this module imports no Flower code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Flower minor versions CI tests this package with (contiguous, oldest first).
TESTED_FLOWER = ("1.42",)
_NEWEST_MAJOR, _NEWEST_MINOR = (int(part) for part in TESTED_FLOWER[-1].split("."))
#: The Flower dependency every pyproject of this repository declares: the tested minors.
FLOWER_REQUIREMENT = f"flwr[simulation]>={TESTED_FLOWER[0]},<{_NEWEST_MAJOR}.{_NEWEST_MINOR + 1}"
#: The command that installs a tested Flower.
FLOWER_FIX = f'pip install "flwr[simulation]=={TESTED_FLOWER[-1]}.*"'
#: Module and ``module:function`` of Flower's ``flwr-clientapp`` command.
CLIENTAPP_MODULE = "flwr.supernode.cli.flwr_clientapp"
CLIENTAPP_ENTRY_POINT = f"{CLIENTAPP_MODULE}:flwr_clientapp"

_checked_version: str | None = None


class UnsupportedFlowerError(ImportError):
    """The installed Flower is not a tested version, or lacks a non-public name this needs."""


def installed_flower_version() -> str:
    """The installed Flower's version (``flwr`` or ``flwr-nightly``), read without importing it."""
    for distribution in ("flwr", "flwr-nightly"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise UnsupportedFlowerError(f"Flower is not installed; fix: {FLOWER_FIX}")


def _minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{int(match[1])}.{int(match[2])}" if match else version


def check_flower_version(needed_for: str = "Flower's internals", instead: str = "") -> str:
    """The installed Flower version; UnsupportedFlowerError unless it is in TESTED_FLOWER.

    ``needed_for`` names what is reached for and ``instead`` an alternative to offer, both for
    the message. A passing check is remembered for the process.
    """
    global _checked_version
    if _checked_version is not None:
        return _checked_version
    version = installed_flower_version()
    if _minor(version) not in TESTED_FLOWER:
        raise UnsupportedFlowerError(
            f"flwr-splitms uses {needed_for}, which is not Flower's public API and was tested "
            f"with flwr {', '.join(TESTED_FLOWER)} only; flwr {version} is installed. "
            f"Fix: {FLOWER_FIX}{instead}"
        )
    _checked_version = version
    return version


def _flower_name(module: str, name: str, instead: str = "") -> Any:
    """``module.name`` after the version check; UnsupportedFlowerError naming it if missing."""
    where = f"{module}.{name}"
    version = check_flower_version(where, instead)
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UnsupportedFlowerError(
            f"flwr {version} has no {where} ({type(err).__name__}: {err}), which flwr-splitms "
            f"needs and which flwr {', '.join(TESTED_FLOWER)} has. Fix: {FLOWER_FIX}{instead}"
        ) from err
    return found


_USE_SUPERNODE = "; or run Flower's own `flower-supernode`"
_USE_SUPEREXEC = "; or run Flower's own `flower-superexec`"


def sample_nodes(
    grid: Any, min_available_nodes: int, sample_size: int
) -> tuple[list[int], list[int]]:
    """Flower's ``sample_nodes``: wait for ``min_available_nodes``, sample ``sample_size``.

    Returns the sampled node IDs and all connected ones, as Flower's strategies sample.
    """
    flower: Callable[[Any, int, int], tuple[list[int], list[int]]] = _flower_name(
        "flwr.serverapp.strategy.strategy_utils", "sample_nodes"
    )
    return flower(grid, min_available_nodes, sample_size)


def superexec_loop() -> ModuleType:
    """The module of Flower's SuperExec loop: ``run_superexec`` runs it, ``get_executor`` builds
    its executor (and is what ``flwr-splitms-superexec`` replaces)."""
    module = "flwr.supercore.superexec.run_superexec"
    for name in ("run_superexec", "get_executor"):
        _flower_name(module, name, _USE_SUPEREXEC)
    return importlib.import_module(module)


def subprocess_executor() -> Any:
    """A new Flower executor that starts each task as a new process (Flower's default)."""
    executor = _flower_name(
        "flwr.supercore.superexec.executor.subprocess_executor",
        "SubprocessExecutor",
        _USE_SUPEREXEC,
    )
    return executor()


def task_command(task_type: Any) -> tuple[str, str]:
    """The command Flower runs for a task type and its Runtime API address option.

    KeyError for a task type Flower does not start as a command.
    """
    commands = _flower_name("flwr.supercore.constant", "TASK_TYPE_TO_COMMAND", _USE_SUPEREXEC)
    address_options = _flower_name(
        "flwr.supercore.constant", "TASK_TYPE_TO_APPIO_API_ADDRESS_ARG", _USE_SUPEREXEC
    )
    return str(commands[task_type]), str(address_options[task_type])


def launch_accepted() -> Any:
    """The ``LaunchResult`` an executor returns for a task it started."""
    result = _flower_name("flwr.supercore.superexec.executor.types", "LaunchResult", _USE_SUPEREXEC)
    return result.accepted()


def load_superexec_auth_secret(secret_file: str) -> bytes | None:
    """The SuperExec's shared secret, read as Flower's ``--superexec-auth-secret-file`` reads it."""
    load = _flower_name("flwr.supercore.auth", "load_superexec_auth_secret", _USE_SUPEREXEC)
    secret: bytes | None = load(secret_file=secret_file)
    return secret


def clientapp_entry_point() -> str:
    """``module:function`` of Flower's ``flwr-clientapp`` command, checked to resolve."""
    module, _, name = CLIENTAPP_ENTRY_POINT.partition(":")
    _flower_name(module, name, _USE_SUPEREXEC)
    return CLIENTAPP_ENTRY_POINT


def supernode_loop() -> ModuleType:
    """The module of Flower's SuperNode loop, whose ``time`` and ``subprocess`` are modules
    (``flwr-splitms-supernode`` replaces those two globals)."""
    module = "flwr.supernode.start_client_internal"
    for name in ("time", "subprocess"):
        if not isinstance(_flower_name(module, name, _USE_SUPERNODE), ModuleType):
            raise UnsupportedFlowerError(
                f"{module}.{name} is not the `{name}` module in this Flower, so "
                f"flwr-splitms-supernode cannot tune it. Fix: {FLOWER_FIX}{_USE_SUPERNODE}"
            )
    return importlib.import_module(module)


def flower_supernode() -> Callable[[], None]:
    """The entry point of Flower's ``flower-supernode`` command (reads ``sys.argv``)."""
    entry: Callable[[], None] = _flower_name(
        "flwr.supernode.cli.flower_supernode", "flower_supernode", _USE_SUPERNODE
    )
    return entry
