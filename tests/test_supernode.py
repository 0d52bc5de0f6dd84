"""flwr-splitms-supernode: Flower's SuperNode with a bounded idle poll and the forking SuperExec."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from typing import Any

import pytest

from flwr_splitms import flower_internals, supernode
from flwr_splitms.flower_internals import FLOWER_FIX

node = flower_internals.supernode_loop()
# the module, not the function that flwr.supernode.cli exports under the same name
flower_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")


def test_bounded_sleep_caps_flowers_fixed_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    sleep = supernode.bounded_sleep(0.2)
    sleep(3)  # the SuperNode's idle sleep
    sleep(0.5)  # its reply check
    sleep(0.05)  # a shorter sleep is kept
    assert slept == [0.2, 0.2, 0.05]


def test_popen_starts_the_forking_superexec_instead_of_flowers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[Any] = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: started.append(args))
    supernode.warm_superexec_popen(
        ["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094"]
    )
    supernode.warm_superexec_popen(["something-else", "--x"])
    assert started[0] == [
        sys.executable, "-m", "flwr_splitms.superexec",
        "--insecure", "--runtime-api-address", "127.0.0.1:9094",
    ]  # fmt: skip
    assert started[1] == ["something-else", "--x"]


def test_own_options_are_taken_and_flowers_passed_on() -> None:
    args, rest = supernode._parse_args(
        ["--insecure", "--poll", "0.5", "--superlink", "h:9092", "--isolation", "subprocess"]
    )
    assert args.poll == 0.5 and not args.flower_superexec
    assert rest == ["--insecure", "--superlink", "h:9092", "--isolation", "subprocess"]


def test_a_poll_out_of_range_is_refused_with_its_bounds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        supernode._parse_args(["--poll", "10"])
    assert "--poll must be between 0.01 and 3 seconds, got 10.0" in capsys.readouterr().err


@pytest.mark.parametrize("flower_superexec", [False, True])
def test_main_runs_flowers_supernode_with_the_two_changes(
    monkeypatch: pytest.MonkeyPatch, flower_superexec: bool
) -> None:
    # keep Flower's module as it was after the test
    monkeypatch.setattr(node, "time", node.time)
    monkeypatch.setattr(node, "subprocess", node.subprocess)
    monkeypatch.setattr(sys, "argv", sys.argv)
    seen: dict[str, Any] = {}

    def fake_supernode() -> None:
        seen["argv"] = list(sys.argv)
        seen["popen"] = node.subprocess.Popen
        tic = time.perf_counter()
        node.time.sleep(3)
        seen["slept"] = time.perf_counter() - tic
        seen["time"] = node.time.time()  # every other name is the real module's

    monkeypatch.setattr(flower_cli, "flower_supernode", fake_supernode)
    argv = ["--poll", "0.01", "--insecure", "--superlink", "127.0.0.1:1"]
    supernode.main([*argv, "--flower-superexec"] if flower_superexec else argv)
    assert seen["argv"] == ["flower-supernode", "--insecure", "--superlink", "127.0.0.1:1"]
    assert seen["slept"] < 1.0 and abs(seen["time"] - time.time()) < 60
    expected = subprocess.Popen if flower_superexec else supernode.warm_superexec_popen
    assert seen["popen"] is expected


def test_a_superexec_that_could_not_run_is_refused_before_the_node_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr_splitms import superexec

    monkeypatch.setattr(superexec, "DEFAULT_PRELOAD", ("json", "no_such_module_here"))
    with pytest.raises(SystemExit, match=r"no_such_module_here not installed.*--flower-superexec"):
        supernode.main(["--insecure"])

    def untested() -> None:
        raise SystemExit("flwr-splitms-superexec: flwr 1.43.0 is installed")

    monkeypatch.setattr(superexec, "flower_superexec_loop", untested)
    with pytest.raises(SystemExit, match=r"1\.43\.0 is installed.*with --flower-superexec"):
        supernode.main(["--insecure"])


def test_an_untested_flower_is_refused_before_anything_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flower_internals, "_checked_version", None)
    monkeypatch.setattr(flower_internals, "installed_flower_version", lambda: "1.43.0")
    time_before, subprocess_before = node.time, node.subprocess
    with pytest.raises(SystemExit) as stop:
        supernode.main(["--insecure"])
    message = str(stop.value.code)
    assert message.startswith("flwr-splitms-supernode:") and "flwr 1.43.0 is installed" in message
    assert FLOWER_FIX in message and "`flower-supernode`" in message
    assert node.time is time_before and node.subprocess is subprocess_before
