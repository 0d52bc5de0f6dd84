"""Regenerate the README figures by executing the study notebooks headless.

    python scripts/make_figures.py                 # both notebooks at their default size
    python scripts/make_figures.py 02 --set ROUNDS=20 --set "CUTS=['shallow', 'deep']"

Each notebook runs (nbclient) in a temporary working directory with ``SAVE_FIGURES = True`` and
``FIGURE_DIR = <repo>/docs/figures`` injected after its ``parameters`` cell (plus any ``--set``
overrides, Python literals), so it writes ``compression_error.png`` / ``convergence.png`` there.
The notebooks in ``notebooks/`` stay without outputs; ``--executed DIR`` keeps executed copies.
"""

from __future__ import annotations

import argparse
import ast
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
    parser.add_argument("--executed", help="folder for the executed notebooks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    overrides = parse_set(args.set)
    unknown = set(args.which) - set(NOTEBOOKS)
    if unknown:
        parser.error(f"unknown notebook(s) {sorted(unknown)}; choose from {sorted(NOTEBOOKS)}")
    for key in args.which or list(NOTEBOOKS):
        path = NOTEBOOKS[key]
        with tempfile.TemporaryDirectory() as workdir:
            values: dict[str, Any] = {"SAVE_FIGURES": True, "FIGURE_DIR": args.figures}
            if key == "02":
                values.update(
                    OUTPUT_DIR=str(Path(workdir) / "runs"), PRESET_DIR=str(ROOT / "strategies")
                )
            values.update(overrides)
            nb = inject(nbformat.read(path, as_version=4), values)
            started = time.perf_counter()
            nbclient.NotebookClient(
                nb,
                timeout=args.timeout,
                kernel_name="python3",
                resources={"metadata": {"path": workdir}},
            ).execute()
            elapsed = time.perf_counter() - started
        print(f"{path.name}: {elapsed:.0f} s")
        if args.executed:
            out = Path(args.executed)
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
