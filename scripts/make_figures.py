"""Regenerate the README figures by executing the study notebooks headless.

    python scripts/make_figures.py                 # both notebooks at their default size
    python scripts/make_figures.py 02 --set ROUNDS=20 --set "CUTS=['shallow', 'deep']"

Each notebook runs (nbclient) in a temporary working directory with ``SAVE_FIGURES = True`` and
``FIGURE_DIR = <repo>/docs/figures`` injected after its ``parameters`` cell (plus any ``--set``
overrides, Python literals), so it writes ``compression_error.png`` / ``convergence.png`` there.
The convergence notebook's histories go to ``<repo>/outputs/convergence`` (``--runs``), the folder
the README's study snippet reads. The notebooks in ``notebooks/`` stay without outputs;
``--executed DIR`` keeps executed copies.

Deterministic on one machine: the kernel runs with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``), ``PYTHONHASHSEED=0``, torch's deterministic algorithms and seeded
``random``/numpy/torch generators (a cell injected before the notebook's first cell), so a second
run writes byte-identical PNGs. Another CPU or library version may change the last digits.
"""

from __future__ import annotations

import argparse
import ast
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "01": ROOT / "notebooks" / "01_compression_error.ipynb",
    "02": ROOT / "notebooks" / "02_splitfed_convergence.ipynb",
}


# Environment of the notebook kernel: one thread and fixed hashing, for identical numbers.
DETERMINISTIC_ENV = {
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "MPLBACKEND": "agg",
}
DETERMINISM_CELL = """# Injected by scripts/make_figures.py: same numbers and figures on every run
import random

import numpy as np
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True, warn_only=True)
random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
"""


def make_deterministic(nb: Any) -> Any:
    """Put the seeding and single-thread cell before the notebook's first cell."""
    cell = nbformat.v4.new_code_cell(DETERMINISM_CELL, metadata={"tags": ["injected-determinism"]})
    nb.cells.insert(0, cell)
    return nb


def run_notebook(path: Path, values: dict[str, Any], workdir: Path, timeout: int) -> Any:
    """Execute the notebook at ``path`` with ``values`` injected; returns the executed notebook."""
    nb = make_deterministic(inject(nbformat.read(path, as_version=4), values))
    saved = {key: os.environ.get(key) for key in DETERMINISTIC_ENV}
    os.environ.update(DETERMINISTIC_ENV)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
        ).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def inject(nb: Any, values: dict[str, Any]) -> Any:
    """Insert a cell assigning ``values`` after the cell tagged ``parameters`` (papermill style)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not tagged:
        raise SystemExit("notebook has no cell tagged 'parameters'")
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def parse_set(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, literal = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            values[key.strip()] = literal  # a bare string
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", help="01 and/or 02 (default: both)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    parser.add_argument(
        "--runs", default=str(ROOT / "outputs" / "convergence"), help="histories of notebook 02"
    )
    parser.add_argument("--executed", help="folder for the executed notebooks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    overrides = parse_set(args.set)
    unknown = set(args.which) - set(NOTEBOOKS)
    if unknown:
        parser.error(f"unknown notebook(s) {sorted(unknown)}; choose from {sorted(NOTEBOOKS)}")
    for key in args.which or list(NOTEBOOKS):
        path = NOTEBOOKS[key]
        values: dict[str, Any] = {"SAVE_FIGURES": True, "FIGURE_DIR": args.figures}
        if key == "02":
            values.update(OUTPUT_DIR=args.runs, PRESET_DIR=str(ROOT / "strategies"))
        values.update(overrides)
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            nb = run_notebook(path, values, Path(workdir), args.timeout)
            elapsed = time.perf_counter() - started
        print(f"{path.name}: {elapsed:.0f} s")
        if args.executed:
            out = Path(args.executed)
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
