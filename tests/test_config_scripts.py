"""scripts/make_figures.py: the same notebook gives byte-identical figures on a second run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Unseeded on purpose: only make_figures' injected seeding makes two runs agree.
PLOT = """
import numpy as np, torch, matplotlib
matplotlib.use("agg")
import matplotlib.pyplot as plt
from pathlib import Path
x = torch.randn(200).cumsum(0) + torch.tensor(np.random.rand(200))
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot(x.numpy())
fig.savefig(Path(FIGURE_DIR) / "walk.png", dpi=40)
Path(FIGURE_DIR, "threads.txt").write_text(str(torch.get_num_threads()))
"""


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts/make_figures.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # starts two Jupyter kernels (about 15 s on two busy cores)
def test_make_figures_is_deterministic(tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    make_figures = load_script()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('FIGURE_DIR = "unset"', metadata={"tags": ["parameters"]})
    nb.cells = [params, nbformat.v4.new_code_cell(PLOT)]
    path = tmp_path / "walk.ipynb"
    nbformat.write(nb, path)
    pngs = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        make_figures.run_notebook(path, {"FIGURE_DIR": str(out)}, tmp_path, timeout=120)
        pngs.append((out / "walk.png").read_bytes())
        assert (out / "threads.txt").read_text() == "1"
    assert pngs[0] == pngs[1]
