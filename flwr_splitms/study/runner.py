"""Run a study's grid, one folder per run, resumable; then summarise it.

Layout under the output folder ``DIR``::

    DIR/study.json                      the study as run (grid, run-config, overrides)
    DIR/runs/<policy>-<cut>-s<seed>/    history.csv, then run.json (written last: the marker)
    DIR/summary.csv, DIR/summary.md     Table 1 analog over seeds
    DIR/accuracy_vs_rounds.png, DIR/accuracy_vs_traffic.png

A run whose ``run.json`` says ``"finished": true`` for the same run-config, clients and engine
is skipped when the study is started again, so an interrupted study resumes where it stopped;
a run whose settings changed (say ``--set num-server-rounds=20``) runs again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from flwr_splitms.history import (
    HISTORY_FILENAME,
    SIDECAR_FILENAME,
    load_history,
    save_history,
    with_total_bytes,
)
from flwr_splitms.storage import atomic_write_text

from .spec import GridRun, StudySpec
from .summary import write_summary

__all__ = [
    "Engine",
    "StudyResult",
    "collect_histories",
    "run_flwr",
    "run_grid_local",
    "run_study",
]

log = logging.getLogger("flwr")

Engine = Literal["local", "flwr"]
RunFn = Callable[[GridRun, int, Path], pd.DataFrame]


@dataclass
class StudyResult:
    """What :func:`run_study` produced: the per-round histories, the summary and its files."""

    out: Path
    histories: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]
    ran: list[str]
    skipped: list[str]


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _finished(folder: Path, sidecar: Mapping[str, Any]) -> bool:
    """True if ``folder`` holds a finished run with exactly these settings."""
    marker = folder / SIDECAR_FILENAME
    if not (marker.is_file() and (folder / HISTORY_FILENAME).is_file()):
        return False
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or not done.get("finished"):
        return False
    keys = ("run-config", "num-clients", "engine")
    same = all(done.get(k) == _json_roundtrip(sidecar[k]) for k in keys)
    if not same:
        log.warning("%s: settings changed since it finished; running it again", folder.name)
    return same


def run_grid_local(device: str = "cpu") -> RunFn:
    """The local engine as a study run function (:func:`flwr_splitms.local.run_local`)."""

    def run(grid_run: GridRun, num_clients: int, folder: Path) -> pd.DataFrame:
        from flwr_splitms.local import run_local  # torch-heavy; imported when a run starts

        return run_local(grid_run.config(), num_clients, device=device).history

    return run


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def run_flwr(app: str | Path, flwr: str = "flwr", timeout: float | None = None) -> RunFn:
    """Each run through ``flwr run <app> --run-config ... --stream`` on the simulation engine.

    ``app`` is a Flower app that reads the run-config keys of
    :class:`~flwr_splitms.config.SplitConfig` and writes ``history.csv`` to its ``output-dir``
    (the example ``examples/cifar100_resnet18`` does). The number of clients goes to
    ``--federation-config num-supernodes=N``. Flower's output is logged; a failed run raises.
    """
    app_path = Path(app).expanduser().resolve()
    if not (app_path / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no Flower app at {app_path} (pyproject.toml missing); pass --app")

    def run(grid_run: GridRun, num_clients: int, folder: Path) -> pd.DataFrame:
        output = (folder / "flwr").resolve()
        if output.exists():
            shutil.rmtree(output)
        config = {**grid_run.config().to_run_config(), "output-dir": str(output)}
        run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        command = [
            flwr,
            "run",
            str(app_path),
            "--stream",
            "--run-config",
            run_config,
            "--federation-config",
            f"num-supernodes={num_clients}",
        ]
        log.info("%s: %s", grid_run.name, " ".join(command[:4]))
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        atomic_write_text(folder / "flwr.log", done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(
                f"{grid_run.name}: flwr run failed (exit {done.returncode}); "
                f"see {folder / 'flwr.log'}"
            )
        history = output / HISTORY_FILENAME
        if not history.is_file():
            raise RuntimeError(
                f"{grid_run.name}: the app wrote no {history}; does it honour output-dir?"
            )
        return pd.read_csv(history)

    return run


def _duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_study(
    spec: StudySpec,
    out: str | Path,
    *,
    engine: Engine = "local",
    device: str = "cpu",
    app: str | Path | None = None,
    run_fn: RunFn | None = None,
    figures: bool = True,
) -> StudyResult:
    """Run every grid cell of ``spec`` not finished yet under ``out``, then summarise.

    ``engine="local"`` trains in this process on ``device``; ``engine="flwr"`` runs each cell as
    ``flwr run <app>`` (see :func:`run_flwr`). ``run_fn`` replaces the engine (tests). Logs one
    progress line per run (elapsed time and an estimate of what is left). ``figures=False``
    skips the PNG curves.
    """
    out = Path(out).expanduser()
    if run_fn is None:
        if engine == "local":
            run_fn = run_grid_local(device)
        elif engine == "flwr":
            if app is None:
                raise ValueError("engine 'flwr' needs app= (the Flower app folder)")
            run_fn = run_flwr(app)
        else:
            raise ValueError(f"unknown engine {engine!r}; choose 'local' or 'flwr'")
    atomic_write_text(out / "study.json", json.dumps(spec.to_dict(), indent=2, default=str))
    runs = spec.runs()
    started = time.perf_counter()
    ran: list[str] = []
    skipped: list[str] = []
    run_seconds: list[float] = []
    for index, grid_run in enumerate(runs, start=1):
        folder = out / "runs" / grid_run.name
        sidecar: dict[str, Any] = {
            "policy": grid_run.policy,
            "cut": grid_run.cut,
            "seed": grid_run.seed,
            "num-clients": spec.num_clients,
            "engine": engine,
            "run-config": grid_run.config().to_run_config(),
        }
        if _finished(folder, sidecar):
            skipped.append(grid_run.name)
            log.info("[study %d/%d] %s: finished before, skipped", index, len(runs), grid_run.name)
            continue
        (folder / SIDECAR_FILENAME).unlink(missing_ok=True)  # unfinished until written again
        tic = time.perf_counter()
        history = with_total_bytes(run_fn(grid_run, spec.num_clients, folder))
        seconds = time.perf_counter() - tic
        save_history(history, folder / HISTORY_FILENAME)
        sidecar.update(finished=True, seconds=round(seconds, 3))
        atomic_write_text(folder / SIDECAR_FILENAME, json.dumps(sidecar, indent=2))
        ran.append(grid_run.name)
        run_seconds.append(seconds)
        left = (len(runs) - index) * sum(run_seconds) / len(run_seconds)
        best = history["test_accuracy"].max()
        log.info(
            "[study %d/%d] %s: %.1fs, best acc %s | elapsed %s, about %s left",
            index,
            len(runs),
            grid_run.name,
            seconds,
            "n/a" if math.isnan(best) else f"{best:.3f}",
            _duration(time.perf_counter() - started),
            _duration(left),
        )
    histories = collect_histories(spec, out)
    summary, files = write_summary(spec, histories, out, figures=figures)
    log.info("[study] %d run(s), %d skipped; summary in %s", len(ran), len(skipped), out)
    return StudyResult(out, histories, summary, files, ran, skipped)


def collect_histories(spec: StudySpec, out: str | Path) -> pd.DataFrame:
    """The histories of ``spec``'s grid under ``out`` (finished runs only), with a ``seed``
    column; runs of other studies in the same folder are ignored."""
    frames = []
    for grid_run in spec.runs():
        folder = Path(out) / "runs" / grid_run.name
        if not (folder / SIDECAR_FILENAME).is_file():
            continue
        df = load_history(folder / HISTORY_FILENAME, policy=grid_run.policy, cut=grid_run.cut)
        frames.append(df.assign(seed=grid_run.seed))
    if not frames:
        raise FileNotFoundError(f"no finished runs of study {spec.name!r} under {out}")
    return pd.concat(frames, ignore_index=True)
