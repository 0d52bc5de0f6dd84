"""flwr-splitms-superexec: a template process imports once and forks one child per task."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

from flwr_splitms import flower_internals, superexec
from flwr_splitms.flower_internals import FLOWER_FIX
from flwr_splitms.superexec import ForkingExecutor, Template, TemplateError

PROBE = '''
import json, os, sys

def record() -> None:
    """Write what this task process sees, then exit with the code in argv (if any)."""
    import probe_heavy
    import torch
    out = os.environ["PROBE_OUT"]
    name = sys.argv[-1] if sys.argv[-1].endswith(".json") else f"task-{os.getpid()}.json"
    info = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "argv": sys.argv,
        "heavy_imported_in": probe_heavy.IMPORTED_IN,
        "draw": torch.rand(4).tolist(),
    }
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    if "--fail" in sys.argv:
        raise RuntimeError("the task failed")
    raise SystemExit(3 if "--exit3" in sys.argv else 0)
'''


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Importable probe modules and a folder where forked tasks write what they saw."""
    (tmp_path / "probe_task.py").write_text(textwrap.dedent(PROBE))
    (tmp_path / "probe_heavy.py").write_text("import os\nIMPORTED_IN = os.getpid()\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PROBE_OUT", str(out))
    yield out
    for name in ("probe_task", "probe_heavy"):
        sys.modules.pop(name, None)


@pytest.fixture
def template(probe: Path) -> Iterator[Template]:
    started = Template(
        preload=["torch", "probe_heavy"], entry_points={"probe": "probe_task:record"}
    )
    started.start(timeout=120)
    try:
        yield started
    finally:
        started.close()


def wait_for_file(path: Path, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def test_tasks_are_forks_of_the_template_and_reuse_its_imports(
    template: Template, probe: Path
) -> None:
    pids = [template.fork(["probe", f"{i}.json"]) for i in range(2)]
    seen = [wait_for_file(probe / f"{i}.json") for i in range(2)]
    assert [s["pid"] for s in seen] == pids
    assert all(s["ppid"] == template.pid for s in seen)  # forked by the template
    # the module was imported once, in the template, not again in each task
    assert all(s["heavy_imported_in"] == template.pid for s in seen)
    assert seen[0]["argv"] == ["probe", "0.json"]
    assert template.preload_seconds >= 0


def test_each_task_gets_fresh_random_state(template: Template, probe: Path) -> None:
    template.fork(["probe", "a.json"])
    template.fork(["probe", "b.json"])
    draws = [wait_for_file(probe / f"{n}.json")["draw"] for n in "ab"]
    assert draws[0] != draws[1], "forked tasks share torch's RNG state"


def test_failing_tasks_do_not_hurt_the_template_and_leave_no_zombies(
    template: Template, probe: Path
) -> None:
    template.fork(["probe", "--fail", "f.json"])
    template.fork(["probe", "--exit3", "e.json"])
    wait_for_file(probe / "f.json")
    wait_for_file(probe / "e.json")
    assert template.alive
    deadline = time.monotonic() + 30
    while psutil.Process(template.pid).children():
        assert time.monotonic() < deadline, "task processes were not reaped"
        time.sleep(0.05)
    template.fork(["probe", "after.json"])
    assert wait_for_file(probe / "after.json")["ppid"] == template.pid


def test_unknown_command_is_refused_by_name(template: Template) -> None:
    with pytest.raises(TemplateError, match=r"no entry point for \['flwr-serverapp'\]"):
        template.fork(["flwr-serverapp", "--token", "x"])
    assert template.alive


def test_a_module_that_cannot_be_preloaded_is_named(probe: Path) -> None:
    broken = Template(preload=["json", "no_such_module_for_the_template"], entry_points={})
    with pytest.raises(TemplateError, match="cannot import 'no_such_module_for_the_template'"):
        broken.start(timeout=60)
    assert broken.pid == 0


def test_closing_stops_the_template(probe: Path) -> None:
    started = Template(preload=["json"], entry_points={"probe": "probe_task:record"})
    started.start(timeout=60)
    pid = started.pid
    started.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(TemplateError, match="not running"):
        started.fork(["probe"])


class RecordingFallback:
    """Stands in for Flower's subprocess executor."""

    def __init__(self) -> None:
        self.launched: list[ExecutionSpec] = []
        self.closed = False

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        self.launched.append(spec)
        return LaunchResult.accepted()

    def get_eligible_capacity(self, types: set[Any], **_: Any) -> tuple[set[Any], set[str]]:
        return types, set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def spec(task_type: TaskType = TaskType.CLIENT_APP, **extra: Any) -> ExecutionSpec:
    fields: dict[str, Any] = {
        "task_type": task_type,
        "runtime_api_address": "127.0.0.1:9094",
        "token": "tok-123",
        "insecure": True,
        "root_certificates_path": None,
        "runtime_dependency_install": False,
        "parent_pid": 4242,
        "suppress_output": False,
        "task_id": 7,
        **extra,
    }
    return ExecutionSpec(**fields)


@pytest.fixture
def clientapp_template(probe: Path) -> Iterator[Template]:
    """A template whose ``flwr-clientapp`` entry point is the probe."""
    started = Template(preload=["torch"], entry_points={"flwr-clientapp": "probe_task:record"})
    started.start(timeout=120)
    try:
        yield started
    finally:
        started.close()


def test_executor_forks_clientapp_tasks_with_flowers_arguments(
    clientapp_template: Template, probe: Path
) -> None:
    fallback = RecordingFallback()
    executor = ForkingExecutor(clientapp_template, fallback=fallback)
    assert executor.launch(spec()).status == "accepted"
    deadline = time.monotonic() + 60
    while not list(probe.glob("task-*.json")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    seen = json.loads(next(probe.glob("task-*.json")).read_text())
    # exactly the command line Flower's SubprocessExecutor gives a new flwr-clientapp process
    assert seen["argv"] == [
        "flwr-clientapp", "--runtime-api-address", "127.0.0.1:9094", "--token", "tok-123",
        "--insecure", "--parent-pid", "4242",
    ]  # fmt: skip
    assert seen["ppid"] == clientapp_template.pid
    assert executor.forked == 1 and not fallback.launched


def test_executor_leaves_other_tasks_to_flowers_executor(clientapp_template: Template) -> None:
    fallback = RecordingFallback()
    executor = ForkingExecutor(clientapp_template, fallback=fallback)
    executor.launch(spec(TaskType.SERVER_APP))
    executor.launch(spec(runtime_dependency_install=True))
    assert len(fallback.launched) == 2 and executor.forked == 0
    executor.close()
    assert fallback.closed and not clientapp_template.alive


def test_executor_falls_back_with_one_warning_when_the_template_is_gone(
    clientapp_template: Template, caplog: pytest.LogCaptureFixture
) -> None:
    fallback = RecordingFallback()
    executor = ForkingExecutor(clientapp_template, fallback=fallback)
    clientapp_template.close()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        for _ in range(3):
            assert executor.launch(spec()).status == "accepted"
    assert len(fallback.launched) == 3
    warnings = [r for r in caplog.records if "as new processes" in r.getMessage()]
    assert len(warnings) == 1


def test_main_names_the_module_it_cannot_preload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(superexec.POLL_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        superexec.main(
            ["--insecure", "--preload", "json", "--extra-preload", "not_installed_anywhere"]
        )
    message = str(stop.value.code)
    assert "'not_installed_anywhere'" in message and "--extra-preload" in message
    assert os.environ[superexec.POLL_ENV] == str(superexec.DEFAULT_TASK_POLL_INTERVAL)


def test_task_poll_flag_sets_flowers_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(superexec.POLL_ENV, "2")
    with pytest.raises(SystemExit):
        superexec.main(["--task-poll-interval", "0.2", "--preload", "not_installed_anywhere"])
    assert os.environ[superexec.POLL_ENV] == "0.2"


def test_a_template_that_does_not_answer_is_stopped_not_reused(probe: Path) -> None:
    started = Template(preload=["json"], entry_points={"probe": "probe_task:record"})
    started.start(timeout=60)
    pid = started.pid
    os.kill(pid, signal.SIGSTOP)  # alive, but it will never answer
    with pytest.raises(TemplateError, match="did not answer"):
        started.fork(["probe"], timeout=0.5)
    assert not started.alive and not psutil.pid_exists(pid)
    with pytest.raises(TemplateError, match="not running"):
        started.fork(["probe"])


def test_a_platform_without_fork_is_told_to_use_flowers_superexec(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "fork")
    with pytest.raises(SystemExit, match=r"no os\.fork.*flower-superexec"):
        superexec.flower_superexec_loop()


def test_an_untested_flower_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flower_internals, "_checked_version", None)
    monkeypatch.setattr(flower_internals, "installed_flower_version", lambda: "1.43.0")
    with pytest.raises(SystemExit) as stop:
        superexec.main(["--insecure", "--preload", "json"])
    message = str(stop.value.code)
    assert message.startswith("flwr-splitms-superexec:") and "flwr 1.43.0 is installed" in message
    assert FLOWER_FIX in message and "`flower-superexec`" in message


def test_the_default_template_runs_flowers_clientapp_command() -> None:
    module, _, name = superexec.ENTRY_POINTS["flwr-clientapp"].partition(":")
    assert module in superexec.DEFAULT_PRELOAD
    assert callable(getattr(importlib.import_module(module), name))
    assert superexec.ENTRY_POINTS["flwr-clientapp"] == flower_internals.clientapp_entry_point()
