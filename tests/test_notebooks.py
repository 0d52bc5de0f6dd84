"""The study notebooks run headless at a small size (nbclient), in a temporary working directory.

Parameters are overridden the papermill way: a cell is injected after the cell tagged
``parameters``. The notebooks in the repository carry no outputs. Both drive the study package
(``flwr_splitms.study``): 02 runs a one-seed grid of every policy, 01 the trained-feature error
study. Executing them takes about 15-30 s each on an idle 2-core CPU (a kernel start included);
they are marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT_S = 600  # per cell
CODECS = {"qu", "sp", "rt", "ms"}

# Smaller than the notebooks' defaults, to keep the suite fast.
TEST_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_compression_error.ipynb": {
        "SYNTHETIC_SIZE": 64,
        "CUTS": ["shallow", "deep"],
        "TRAIN_ROUNDS": 1,
        "TRAIN_STEPS": 2,
        "TRAIN_BATCH": 8,
        "BATCH_SIZE": 4,
        "NUM_BATCHES": 1,
        "QU_BITS": [2, 4],
        "SP_RATIOS": [0.99, 0.9],
        "RT_RATIOS": [0.99, 0.9],
        "MS_RATIOS": [0.99],
        "MS_BITS": [2, 3],
    },
    "02_splitfed_convergence.ipynb": {
        "SYNTHETIC_SIZE": 64,
        "CUTS": ["deep"],
        "SEEDS": [0],
        "NUM_CLIENTS": 2,
        "ROUNDS": 2,
        "STEPS_PER_ROUND": 1,
        "BATCH_SIZE": 4,
        "EVAL_MAX_EXAMPLES": 8,
    },
}


def inject_parameters(nb: Any, values: dict[str, Any]) -> Any:
    """Insert a cell assigning ``values`` right after the cell tagged ``parameters``."""
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert tagged, "no cell tagged 'parameters'"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    injected = nbformat.v4.new_code_cell(
        "# Injected parameters\n" + source, metadata={"tags": ["injected-parameters"]}
    )
    nb.cells.insert(tagged[0] + 1, injected)
    return nb


def execute(path: Path, values: dict[str, Any], workdir: Path) -> Any:
    """Execute a copy of the notebook at ``path`` in ``workdir``; return the executed notebook."""
    nb = inject_parameters(nbformat.read(path, as_version=4), values)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": workdir}}
    )
    client.execute()
    return nb


def outputs_text(nb: Any) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", sorted(TEST_PARAMETERS))
def test_notebook_is_committed_without_outputs(name: str):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip outputs"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    for key in TEST_PARAMETERS[name]:
        assert f"\n{key} = " in "\n" + tagged[0].source, f"{key} is not a parameter of {name}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compression_error_notebook(tmp_path: Path):
    values = {**TEST_PARAMETERS["01_compression_error.ipynb"], "OUTPUT_DIR": str(tmp_path / "e")}
    nb = execute(NOTEBOOKS / "01_compression_error.ipynb", values, tmp_path)
    text = outputs_text(nb)
    assert "notebook ran in" in text
    assert "At the paper's MS policy" in text and "vs QU: MS" in text
    errors = pd.read_csv(tmp_path / "e" / "errors.csv")
    assert set(errors["cut"]) == {"shallow", "deep"} and set(errors["codec"]) == CODECS
    assert not (tmp_path / "docs").exists(), "figures are written only with SAVE_FIGURES"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_convergence_notebook(tmp_path: Path):
    values = {
        **TEST_PARAMETERS["02_splitfed_convergence.ipynb"],
        "OUTPUT_DIR": str(tmp_path / "runs"),
        "PRESET_DIR": str(ROOT / "strategies"),
    }
    nb = execute(NOTEBOOKS / "02_splitfed_convergence.ipynb", values, tmp_path)
    from flwr_splitms.history import load_history

    histories = load_history(tmp_path / "runs" / "runs")  # policy/cut from each run.json
    assert sorted(set(histories["policy"])) == sorted(CODECS | {"none"})
    assert set(histories["cut"]) == {"deep"}
    assert histories.groupby("policy").size().eq(2).all()  # ROUNDS
    summary = pd.read_csv(tmp_path / "runs" / "summary.csv")
    assert list(summary["policy"]) == ["none", "qu", "sp", "rt", "ms"]
    assert (tmp_path / "runs" / "accuracy_vs_traffic.png").is_file()
    assert "traffic_saving_multiplier computed" in outputs_text(nb)
    assert not (tmp_path / "docs").exists(), "figures are written only with SAVE_FIGURES"
