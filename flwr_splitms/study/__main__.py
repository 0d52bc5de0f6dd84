"""Command line of the studies: ``python -m flwr_splitms.study [errors] [options]``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .spec import StudySpec, default_study_file, parse_overrides

log = logging.getLogger("flwr")

DESCRIPTION = """\
Run a SplitFed study: a grid of policies (presets in strategies/) x cuts x seeds, one folder per
run under OUT/runs/, resumable (finished runs are skipped), then OUT/summary.md, OUT/summary.csv
(Table 1 analog over seeds) and PNG curves. With 'errors': train the split model uncompressed,
measure every codec's relative error on its activations at equal bits per element (Fig. 2),
write OUT/errors.csv, OUT/errors_vs_baselines.csv and OUT/errors.png.
"""

EPILOG = """\
examples:
  python -m flwr_splitms.study                                    # studies/default.toml
  python -m flwr_splitms.study --set study.seeds=[0] --set num-server-rounds=4
  python -m flwr_splitms.study --config studies/paper.toml --set data-root=/data --device cuda
  python -m flwr_splitms.study --engine flwr --app examples/cifar100_resnet18
  python -m flwr_splitms.study errors --set errors.checkpoint=outputs/study/errors/model.pt
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also what ``--help`` prints)."""
    parser = argparse.ArgumentParser(
        prog="python -m flwr_splitms.study",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "study",
        nargs="?",
        choices=["grid", "errors"],
        default="grid",
        help="'grid' (default): the convergence study; 'errors': the error study",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="study file (TOML); default studies/default.toml, or studies/errors.toml for errors",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a run-config key in every run (repeatable; VALUE is a TOML value or a "
        "bare string); 'study.KEY' / 'errors.KEY' change the study table instead",
    )
    parser.add_argument("--out", type=Path, help="results folder (default outputs/study/<name>)")
    parser.add_argument(
        "--engine",
        choices=["local", "flwr"],
        default="local",
        help="local: in this process (default); flwr: each run through 'flwr run APP --stream'",
    )
    parser.add_argument(
        "--app",
        type=Path,
        default=Path("examples/cifar100_resnet18"),
        help="the Flower app for --engine flwr (default %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the local engine")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the study, print where the results are. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))
    started = time.perf_counter()
    try:
        if args.study == "errors":
            from .errors import ErrorStudySpec, run_error_study

            path = args.config or default_study_file("errors")
            spec = ErrorStudySpec.from_toml(path, overrides)
            out = args.out or Path("outputs") / "study" / path.stem
            result = run_error_study(spec, out, device=args.device, figures=not args.no_figures)
            files = result.files
        else:
            from .runner import run_study

            path = args.config or default_study_file("default")
            grid = StudySpec.from_toml(path, overrides)
            out = args.out or Path("outputs") / "study" / grid.name
            study = run_study(
                grid,
                out,
                engine=args.engine,
                device=args.device,
                app=args.app,
                figures=not args.no_figures,
            )
            files = study.files
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - started:.0f} s; results in {out}")
    for name, file in files.items():
        print(f"  {name}: {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
