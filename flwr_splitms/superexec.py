"""A SuperNode's SuperExec that starts each ClientApp task as a fork of an already-warm process.

Flower's SuperExec starts a new ``flwr-clientapp`` process for every message, and that process
imports Python, Flower, torch and the app's libraries before it can answer: seconds per message,
and split learning sends one message per node and step. ``flwr-splitms-superexec`` does the
SuperExec's job with Flower's own loop (it asks the SuperNode's Runtime API for tasks), but it
starts a ClientApp task by forking a *template* process that imported those libraries once, when
the SuperExec started. The forked task runs Flower's own ``flwr-clientapp`` entry point with the
arguments Flower's executor would have given the new process, so the ClientApp, its message and
its context are Flower's; only the imports are already done.

Run it next to a SuperNode started with ``--isolation process``::

    flower-supernode --insecure --superlink HOST:9091 --isolation process --port 9094 ...
    flwr-splitms-superexec --insecure --runtime-api-address 127.0.0.1:9094

Flower (1.42) has no public hook for a custom executor: the SuperExec loop builds its executor
with ``get_executor`` from its executor type, so this module replaces that one function of the
loop's module for its own process (reached, like every other non-public Flower name here,
through :mod:`flwr_splitms.flower_internals`, which refuses a Flower version CI does not
test). Tasks it cannot fork (any task other than a ClientApp, a task that asks for runtime
dependency installation, or any task once the template has died) are started the way Flower
starts them, as a new process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr_splitms import flower_internals

log = logging.getLogger("flwr")

#: Modules the template imports by default: what a flwr-splitms ClientApp process needs.
DEFAULT_PRELOAD = (
    "torch",
    "torchvision",
    "numpy",
    flower_internals.CLIENTAPP_MODULE,
    "flwr_splitms.client",
    "flwr_splitms.models",
    "flwr_splitms.data",
)
#: Task commands the template can run in a fork, by the name Flower's executor would exec.
ENTRY_POINTS = {"flwr-clientapp": flower_internals.CLIENTAPP_ENTRY_POINT}
#: The SuperExec's task poll when the environment does not set one (Flower's default is 1 s).
DEFAULT_TASK_POLL_INTERVAL = 0.05
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class TemplateError(RuntimeError):
    """The template process could not start, preload its modules, or fork a task."""


class _Channel:
    """Newline-delimited JSON over a pair of pipe descriptors, with a receive timeout."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = b""

    def send(self, obj: Mapping[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        while data:
            data = data[os.write(self.write_fd, data) :]

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        """The next object; None at end of stream. TimeoutError when nothing came in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if not ready:
                raise TimeoutError("no answer in time")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _resolve(ref: str) -> Callable[[], object]:
    module, _, name = ref.partition(":")
    func: Callable[[], object] = getattr(importlib.import_module(module), name)
    return func


class Template:
    """A forked process that imports ``preload`` once, then forks one child per task.

    ``entry_points`` maps a command name (``argv[0]`` of a task) to ``"module:function"``; the
    child runs that function with ``sys.argv = argv`` and exits with its exit code. Start it
    while the calling process has one thread: it is created with :func:`os.fork`.
    """

    def __init__(
        self,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        entry_points: Mapping[str, str] | None = None,
    ) -> None:
        self.preload = tuple(preload)
        self.entry_points = dict(ENTRY_POINTS if entry_points is None else entry_points)
        self.pid = 0
        self.preload_seconds = float("nan")
        self._channel: _Channel | None = None

    def start(self, timeout: float = 600.0) -> None:
        """Fork the template and wait until it imported every module (TemplateError if not)."""
        if threading.active_count() > 1:
            log.warning("Forking the template from a process with threads running")
        to_template, from_parent = os.pipe()
        to_parent, from_template = os.pipe()
        pid = os.fork()
        if pid == 0:  # the template
            os.close(from_parent)
            os.close(to_parent)
            code = 0
            try:
                _serve(_Channel(to_template, from_template), self.preload, self.entry_points)
            except BaseException:  # nothing may escape a forked child
                traceback.print_exc()
                code = 1
            finally:
                _flush()
                os._exit(code)
        os.close(to_template)
        os.close(from_template)
        self.pid = pid
        self._channel = _Channel(to_parent, from_parent)
        try:
            ready = self._channel.recv(timeout)
        except TimeoutError:
            self.close()
            raise TemplateError(
                f"the template did not import {', '.join(self.preload)} within {timeout:.0f} s"
            ) from None
        if ready is None or "error" in ready:
            self.close()
            why = "it exited" if ready is None else ready["error"]
            raise TemplateError(f"the template could not start: {why}")
        self.preload_seconds = float(ready["seconds"])

    @property
    def alive(self) -> bool:
        """Whether the template process still runs."""
        if not self.pid or self._channel is None:
            return False
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return done == 0

    def fork(
        self, argv: Sequence[str], *, suppress_output: bool = False, timeout: float = 30.0
    ) -> int:
        """Start one task as a fork of the template; its PID. TemplateError when that failed."""
        if self._channel is None or not self.alive:
            raise TemplateError("the template process is not running")
        try:
            self._channel.send({"argv": list(argv), "suppress_output": suppress_output})
            reply = self._channel.recv(timeout)
        except (OSError, TimeoutError) as err:
            self.close()  # a late answer would be read as the next task's: stop using it
            raise TemplateError(f"the template did not answer: {err}") from err
        if reply is None:
            raise TemplateError("the template exited")
        if "error" in reply:
            raise TemplateError(str(reply["error"]))
        return int(reply["pid"])

    def close(self, timeout: float = 5.0) -> None:
        """Stop the template (closing its pipe ends it; SIGKILL after ``timeout``)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if not self.pid:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.pid = 0


def _serve(channel: _Channel, preload: Sequence[str], entry_points: Mapping[str, str]) -> None:
    """The template's life: import, report, then fork a child per request until the pipe ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SuperExec decides; Ctrl-C reaches both
    started = time.perf_counter()
    name = ""
    try:
        for name in [*preload, *(ref.partition(":")[0] for ref in entry_points.values())]:
            importlib.import_module(name)
        entries = {command: _resolve(ref) for command, ref in entry_points.items()}
    except Exception as err:  # reported to the parent, which names the fix
        channel.send({"error": f"cannot import {name!r} ({type(err).__name__}: {err})"})
        return
    # What was imported stays shared with the children: keep the collector off those pages.
    gc.collect()
    gc.freeze()
    # Children are reaped by the kernel; a task's outcome is reported through the Runtime API.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    channel.send({"seconds": time.perf_counter() - started, "threads": threading.active_count()})
    while (request := channel.recv(None)) is not None:
        argv = [str(a) for a in request.get("argv", [])]
        entry = entries.get(argv[0]) if argv else None
        if entry is None:
            channel.send({"error": f"no entry point for {argv[:1]}; known: {sorted(entries)}"})
            continue
        pid = os.fork()
        if pid == 0:
            _run_task(channel, entry, argv, bool(request.get("suppress_output")))
        channel.send({"pid": pid})


def _run_task(
    channel: _Channel, entry: Callable[[], object], argv: list[str], suppress_output: bool
) -> None:
    """In the forked child: become the task process, run ``entry``, exit with its code."""
    code: int = 0
    try:
        channel.close()
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        if suppress_output:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)
        _reseed()
        sys.argv = argv
        entry()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # report, then exit like a crashed process
        traceback.print_exc()
        code = 1
    finally:
        _flush()
        os._exit(code)


def _reseed() -> None:
    """Give the child fresh random state, as a new process has (``random`` reseeds itself)."""
    if (torch := sys.modules.get("torch")) is not None:
        torch.seed()
    if (numpy := sys.modules.get("numpy")) is not None:
        numpy.random.seed()


def _flush() -> None:
    """Flush log handlers and standard streams before ``os._exit`` (a broken one is skipped)."""
    for flushable in [
        *logging.getLogger().handlers,
        *logging.getLogger("flwr").handlers,
        sys.stdout,
        sys.stderr,
    ]:
        with contextlib.suppress(Exception):
            flushable.flush()


class ForkingExecutor:
    """Flower's executor protocol, starting ClientApp tasks as forks of a :class:`Template`.

    Anything else, and every task once the template is gone, goes to ``fallback`` (Flower's
    subprocess executor by default), with one warning.
    """

    def __init__(self, template: Template, fallback: Any = None) -> None:
        if fallback is None:
            fallback = flower_internals.subprocess_executor()
        self.template = template
        self.fallback = fallback
        self.forked = 0
        self._warned = False

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Every task type can start at once, as with Flower's subprocess executor."""
        result: tuple[set[Any], set[str]] = self.fallback.get_eligible_capacity(
            supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path
        )
        return result

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        """Wait as Flower's executor does (its subprocess executor returns at once); a task that
        is forked needs no capacity of its own."""
        self.fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        """Fork a ClientApp task from the template, or start it as a new process."""
        command, address_option = flower_internals.task_command(spec.task_type)
        if command not in self.template.entry_points or spec.runtime_dependency_install:
            return self.fallback.launch(spec)
        argv = [
            command,
            address_option,
            spec.runtime_api_address,
            "--token",
            spec.token,
        ]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        try:
            pid = self.template.fork(argv, suppress_output=spec.suppress_output)
        except TemplateError as err:
            if not self._warned:
                log.warning(
                    "flwr-splitms-superexec: %s; starting tasks as new processes from now on", err
                )
                self._warned = True
            return self.fallback.launch(spec)
        self.forked += 1
        log.debug("Forked %s for task %s as PID %d", command, spec.task_id, pid)
        return flower_internals.launch_accepted()

    def reconcile(self) -> None:
        """Nothing to maintain between polls."""

    def close(self) -> None:
        """Stop the template."""
        self.template.close()
        self.fallback.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flwr-splitms-superexec",
        description="A SuperExec for a SuperNode started with `--isolation process`: it starts "
        "each ClientApp task as a fork of a process that imported torch, Flower and the app's "
        "libraries once, instead of a new process per message.",
    )
    parser.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime API (its --port; default 127.0.0.1:9094)",
    )
    parser.add_argument("--insecure", action="store_true", help="connect without TLS")
    parser.add_argument("--root-certificates", help="PEM root CA for the Runtime API's TLS")
    parser.add_argument(
        "--superexec-auth-secret-file",
        help="the secret file the SuperNode was given with the same option",
    )
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (e.g. the SuperNode) exits"
    )
    parser.add_argument(
        "--preload",
        nargs="+",
        default=list(DEFAULT_PRELOAD),
        metavar="MODULE",
        help="modules the template imports once (default: %(default)s)",
    )
    parser.add_argument(
        "--extra-preload",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="modules imported in addition to --preload (your app's own libraries)",
    )
    parser.add_argument(
        "--task-poll-interval",
        type=float,
        help=f"seconds between the SuperExec's task polls (sets {POLL_ENV}; default: that "
        f"variable, else {DEFAULT_TASK_POLL_INTERVAL})",
    )
    parser.add_argument(
        "--preload-timeout", type=float, default=600.0, help="seconds allowed for the preload"
    )
    parser.add_argument(
        "--allow-runtime-dependency-installation",
        action="store_true",
        help="let tasks install their app's dependencies (such tasks start as new processes)",
    )
    return parser.parse_args(argv)


def flower_superexec_loop() -> Any:
    """Flower's SuperExec loop module; SystemExit naming the fix where it cannot run here."""
    if not hasattr(os, "fork"):
        raise SystemExit(
            "flwr-splitms-superexec forks its tasks, and this platform has no os.fork "
            "(it runs on Linux); use Flower's `flower-superexec`"
        )
    try:
        flower_internals.clientapp_entry_point()
        return flower_internals.superexec_loop()
    except flower_internals.UnsupportedFlowerError as err:
        raise SystemExit(f"flwr-splitms-superexec: {err}") from err


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``flwr-splitms-superexec``."""
    args = _parse_args(argv)
    if args.task_poll_interval is not None:
        os.environ[POLL_ENV] = str(args.task_poll_interval)
    else:
        os.environ.setdefault(POLL_ENV, str(DEFAULT_TASK_POLL_INTERVAL))
    loop = flower_superexec_loop()  # importing it also sets up Flower's log handler
    template = Template([*args.preload, *args.extra_preload])
    try:
        template.start(timeout=args.preload_timeout)
    except TemplateError as err:
        raise SystemExit(
            f"flwr-splitms-superexec: {err}. Install the missing module in this environment or "
            "leave it out of --preload/--extra-preload."
        ) from err
    log.info(
        "flwr-splitms-superexec: template PID %d imported %d modules in %.1f s; "
        "ClientApp tasks start as its forks",
        template.pid,
        len(template.preload),
        template.preload_seconds,
    )
    executor = ForkingExecutor(template)
    loop.get_executor = lambda *_args, **_kwargs: executor
    secret = None
    if args.superexec_auth_secret_file is not None:
        secret = flower_internals.load_superexec_auth_secret(args.superexec_auth_secret_file)
    try:
        loop.run_superexec(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates_path=args.root_certificates,
            superexec_auth_secret=secret,
            parent_pid=args.parent_pid,
            runtime_dependency_install=args.allow_runtime_dependency_installation,
        )
    finally:
        template.close()


if __name__ == "__main__":
    main()
