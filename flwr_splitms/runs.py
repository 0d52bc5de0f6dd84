"""Where a run's results live: one folder per run under ``output-dir``, and resuming the latest.

Every run writes into its own subfolder (``<date>-<time>-run<id>``) and points ``latest`` at it,
so runs never overwrite each other. The folder holds ``run.json`` (the run-config),
``history.csv`` and the newest checkpoints; a run started with ``resume=true`` continues the
latest folder in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from flwr_splitms.storage import atomic_write_text

LATEST = "latest"
RUN_CONFIG_FILE = "run.json"


def output_root(output_dir: str) -> Path:
    """``output-dir`` as an absolute path; a relative one starts at the home folder (a Flower
    app does not run in the user's shell folder)."""
    path = Path(output_dir).expanduser()
    return path if path.is_absolute() else Path.home() / path


def new_run_dir(root: Path, run_id: int | str, run_config: dict[str, Any]) -> Path:
    """Create a fresh run folder with its ``run.json`` and point ``latest`` at it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{stamp}-run{run_id}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = root / f"{stamp}-run{run_id}-{suffix}"
    folder.mkdir(parents=True)
    atomic_write_text(folder / RUN_CONFIG_FILE, json.dumps(run_config, indent=2, sort_keys=True))
    point_latest(root, folder)
    return folder


def point_latest(root: Path, folder: Path) -> None:
    """Make ``root/latest`` name ``folder`` (a symlink; a text file where links are refused)."""
    link = root / LATEST
    tmp = root / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_text(root / f"{LATEST}.txt", folder.name)


def latest_run_dir(root: Path) -> Path | None:
    """The run folder ``latest`` names, or None when there is none."""
    link = root / LATEST
    if link.is_dir():
        return link.resolve()
    pointer = root / f"{LATEST}.txt"
    if pointer.is_file():
        folder = root / pointer.read_text(encoding="utf-8").strip()
        return folder if folder.is_dir() else None
    return None


def saved_run_config(folder: Path) -> dict[str, Any]:
    """The run-config a run folder was started with."""
    return dict(json.loads((folder / RUN_CONFIG_FILE).read_text(encoding="utf-8")))
