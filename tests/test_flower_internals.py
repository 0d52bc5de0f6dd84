"""Flower's non-public names sit behind one version check, and every pyproject declares it."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import itertools
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import pytest

from flwr_splitms import flower_internals
from flwr_splitms.flower_internals import (
    FLOWER_FIX,
    FLOWER_REQUIREMENT,
    TESTED_FLOWER,
    UnsupportedFlowerError,
)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = [
    ROOT / "pyproject.toml",
    *sorted(ROOT.glob("examples/*/pyproject.toml")),
    ROOT / "benchmarks" / "deployment_app" / "pyproject.toml",
]


@pytest.fixture
def flower_version(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Pretend another Flower version is installed (and nothing was checked yet)."""
    pretend = types.SimpleNamespace(version="1.43.0", reads=0)

    def installed() -> str:
        pretend.reads += 1
        return str(pretend.version)

    monkeypatch.setattr(flower_internals, "_checked_version", None)
    monkeypatch.setattr(flower_internals, "installed_flower_version", installed)
    return pretend


@pytest.mark.parametrize("version", ["1.43.0", "1.41.2", "2.0.0", "1.4.2"])
def test_an_untested_flower_is_refused_with_the_versions_and_the_fix(
    flower_version: types.SimpleNamespace, version: str
) -> None:
    flower_version.version = version
    with pytest.raises(UnsupportedFlowerError) as refused:
        flower_internals.sample_nodes(object(), 1, 1)
    message = str(refused.value)
    assert f"flwr {version} is installed" in message
    assert f"tested with flwr {', '.join(TESTED_FLOWER)} only" in message
    assert FLOWER_FIX in message and "strategy_utils.sample_nodes" in message


def test_the_deployment_commands_also_name_flowers_own(
    flower_version: types.SimpleNamespace,
) -> None:
    with pytest.raises(UnsupportedFlowerError, match=r"==1\.42\.\*.*`flower-superexec`"):
        flower_internals.superexec_loop()
    with pytest.raises(UnsupportedFlowerError, match=r"==1\.42\.\*.*`flower-supernode`"):
        flower_internals.supernode_loop()


def test_a_tested_flower_passes_and_is_checked_once(
    flower_version: types.SimpleNamespace,
) -> None:
    flower_version.version = f"{TESTED_FLOWER[-1]}.7"
    assert flower_internals.check_flower_version() == f"{TESTED_FLOWER[-1]}.7"
    flower_internals.superexec_loop()
    flower_internals.supernode_loop()
    assert flower_version.reads == 1


def test_the_installed_flower_is_a_tested_one() -> None:
    """CI installs from pyproject; the version it gets must be one this module accepts."""
    version = flower_internals.installed_flower_version()
    assert version == importlib.metadata.version("flwr")
    assert flower_internals.check_flower_version() == version


def test_every_accessor_resolves_on_the_installed_flower(tmp_path: Path) -> None:
    from flwr.supercore.constant import TaskType

    loop = flower_internals.superexec_loop()
    assert callable(loop.get_executor) and callable(loop.run_superexec)
    assert callable(flower_internals.subprocess_executor().launch)
    command = flower_internals.task_command(TaskType.CLIENT_APP)
    assert command == ("flwr-clientapp", "--runtime-api-address")
    assert flower_internals.launch_accepted().status == "accepted"
    (tmp_path / "secret").write_bytes(b"s3cret")
    assert flower_internals.load_superexec_auth_secret(str(tmp_path / "secret")) == b"s3cret"
    module, _, name = flower_internals.clientapp_entry_point().partition(":")
    assert module == flower_internals.CLIENTAPP_MODULE
    assert callable(getattr(importlib.import_module(module), name))
    node = flower_internals.supernode_loop()
    assert node.time is time and node.subprocess is subprocess
    assert flower_internals.flower_supernode().__name__ == "flower_supernode"


def test_sample_nodes_is_flowers_drop_in() -> None:
    from flwr.serverapp.strategy import strategy_utils

    class Grid:
        def get_node_ids(self) -> list[int]:
            return [3, 5, 8, 13]

    sampled, everyone = flower_internals.sample_nodes(Grid(), 2, 3)
    assert everyone == [3, 5, 8, 13] and len(set(sampled)) == 3 and set(sampled) <= {3, 5, 8, 13}
    ours = inspect.signature(flower_internals.sample_nodes).parameters
    assert list(ours) == list(inspect.signature(strategy_utils.sample_nodes).parameters)


def test_a_name_missing_on_a_tested_flower_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    monkeypatch.delattr(loop, "get_executor")
    with pytest.raises(UnsupportedFlowerError) as refused:
        flower_internals.superexec_loop()
    message = str(refused.value)
    assert "run_superexec.get_executor" in message and FLOWER_FIX in message
    assert "flower-superexec" in message

    node = importlib.import_module("flwr.supernode.start_client_internal")
    monkeypatch.setattr(node, "time", time.sleep)  # a function where the module was
    with pytest.raises(UnsupportedFlowerError, match=r"start_client_internal\.time is not"):
        flower_internals.supernode_loop()


def test_importing_the_module_imports_no_flower() -> None:
    code = (
        "import sys, flwr_splitms.flower_internals\n"
        "loaded = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_requirement_spans_exactly_the_tested_minors() -> None:
    minors = [tuple(int(p) for p in v.split(".")) for v in TESTED_FLOWER]
    assert all(b == (a[0], a[1] + 1) for a, b in itertools.pairwise(minors))
    major, minor = minors[-1]
    expected = f"flwr[simulation]>={TESTED_FLOWER[0]},<{major}.{minor + 1}"
    assert expected == FLOWER_REQUIREMENT


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pyproject_declares_the_tested_flower(pyproject: Path) -> None:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    flower = [d for d in dependencies if d.replace(" ", "").startswith(("flwr[", "flwr>", "flwr="))]
    assert [d.replace(" ", "") for d in flower] == [FLOWER_REQUIREMENT], (
        f"{pyproject.relative_to(ROOT)} declares {flower}; flwr_splitms.flower_internals tests "
        f"{FLOWER_REQUIREMENT}: change one to match the other"
    )
