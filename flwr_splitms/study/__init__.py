"""Studies: grids of SplitFed runs (policies x cuts x seeds) and the trained-feature error study.

    python -m flwr_splitms.study                  # studies/default.toml -> outputs/study/default
    python -m flwr_splitms.study --config studies/paper.toml --set data-root=/data --out results
    python -m flwr_splitms.study errors           # Fig. 2 on trained features

From Python (the notebooks do this)::

    from flwr_splitms.study import StudySpec, run_study
    result = run_study(StudySpec.from_toml("studies/default.toml"), "outputs/study/default")
    result.summary, result.files["accuracy_vs_traffic"]

:mod:`.spec` reads study files, :mod:`.runner` runs the grid (resumable, one folder per run),
:mod:`.summary` writes the Table 1 analog and the curves, :mod:`.errors` measures the codecs'
error on a trained model's activations at equal bits per element.
"""

from .errors import ErrorStudyResult, ErrorStudySpec, compare_to_baselines, run_error_study
from .runner import StudyResult, collect_histories, run_flwr, run_grid_local, run_study
from .spec import GridRun, StudySpec, default_study_file, parse_overrides, parse_value
from .summary import plot_curves, seed_summary, summary_markdown, write_summary

__all__ = [
    "ErrorStudyResult",
    "ErrorStudySpec",
    "GridRun",
    "StudyResult",
    "StudySpec",
    "collect_histories",
    "compare_to_baselines",
    "default_study_file",
    "parse_overrides",
    "parse_value",
    "plot_curves",
    "run_error_study",
    "run_flwr",
    "run_grid_local",
    "run_study",
    "seed_summary",
    "summary_markdown",
    "write_summary",
]
