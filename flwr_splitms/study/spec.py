"""Study files: which policies, cuts and seeds a study runs, and the run-config they share.

A study file is TOML with two tables::

    [study]
    name = "default"
    policies = ["none", "qu", "sp", "rt", "ms"]   # preset names in strategies/
    cuts = ["deep"]                              # shallow | medium | deep | a stage index
    seeds = [0, 1, 2]
    num-clients = 2
    baseline = "none"       # the uncompressed policy the multipliers compare against
    target = "final"        # the baseline accuracy to reach: "final", "best" or a number
    presets = "../strategies"   # relative to the study file; default: found next to the repo

    [run-config]            # SplitConfig keys shared by every run
    dataset = "synthetic"
    num-server-rounds = 6

One run's run-config is the shared one, then the policy's preset, then the cut and the seed,
then the ``--set`` overrides (which therefore apply to every run). ``cut`` and ``seed`` cannot
be ``--set``: they are the grid (``--set study.cuts=["medium"]`` changes the grid instead).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flwr_splitms
from flwr_splitms.config import SplitConfig

__all__ = [
    "GridRun",
    "StudySpec",
    "default_study_file",
    "find_presets",
    "load_preset",
    "parse_overrides",
    "parse_value",
]

GRID_KEYS = ("cut", "seed")
"""Run-config keys the grid sets; ``--set`` refuses them."""


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``0.1``, ``true``, ``[1, 2]``, ``"x"``), else the string.

    So ``--set dataset=mnist`` needs no quotes, and ``--set lr=0.05`` is a float.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.05", "dataset=mnist"]`` -> ``{"lr": 0.05, "dataset": "mnist"}``.

    Raises ValueError for an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (e.g. --set lr=0.05), got {item!r}")
        out[key] = parse_value(value.strip())
    return out


def _repo_roots() -> list[Path]:
    package_root = Path(flwr_splitms.__file__).resolve().parents[1]
    return [Path.cwd(), *Path.cwd().parents, package_root]


def find_presets() -> Path:
    """The ``strategies/`` folder: below the working directory or one of its parents, or next
    to the installed package (a source checkout)."""
    for base in _repo_roots():
        if (base / "strategies" / "none.toml").is_file():
            return base / "strategies"
    raise FileNotFoundError(
        "strategies/ (the preset folder) not found from the working directory or the package; "
        "set presets = '<folder>' in the study file's [study] table"
    )


def default_study_file(name: str = "default") -> Path:
    """``studies/<name>.toml`` of the repository (found like :func:`find_presets`)."""
    for base in _repo_roots():
        path = base / "studies" / f"{name}.toml"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"studies/{name}.toml not found from the working directory or the package; "
        "pass --config FILE"
    )


def load_preset(folder: Path, name: str) -> dict[str, Any]:
    """The run-config dict of ``folder/<name>.toml``; a missing preset names the ones there."""
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml"))
        raise ValueError(f"unknown policy {name!r}: no {path}; presets: {', '.join(known)}")
    with path.open("rb") as handle:
        return tomllib.load(handle)


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid: a policy at a cut with a seed, and its full run-config."""

    policy: str
    cut: str
    seed: int
    run_config: dict[str, Any] = field(compare=False)

    @property
    def name(self) -> str:
        """Folder name of the run: ``<policy>-<cut>-s<seed>``."""
        return f"{self.policy}-{self.cut}-s{self.seed}"

    def config(self) -> SplitConfig:
        """The checked :class:`SplitConfig` of this run."""
        return SplitConfig.from_run_config(self.run_config)


@dataclass(frozen=True)
class StudySpec:
    """A grid of runs: ``policies x cuts x seeds``, each with ``num_clients`` clients.

    ``run_config`` holds the shared SplitConfig keys; ``overrides`` the ``--set`` ones (applied
    last); ``presets`` the folder of the policy presets; ``target`` the baseline accuracy a
    policy must reach (``"final"``, ``"best"`` or a number, see
    :func:`flwr_splitms.history.traffic_saving_multiplier`).
    """

    name: str
    policies: tuple[str, ...]
    cuts: tuple[str, ...]
    seeds: tuple[int, ...]
    num_clients: int = 2
    baseline: str = "none"
    target: str | float = "final"
    presets: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in ("policies", "cuts", "seeds"):
            values = getattr(self, what)
            if not values:
                raise ValueError(f"the study lists no {what}; give at least one")
            if len(set(values)) != len(values):
                raise ValueError(f"the study lists duplicate {what}: {list(values)}")
        if self.baseline not in self.policies:
            raise ValueError(
                f"baseline policy {self.baseline!r} is not among the policies "
                f"{list(self.policies)}; add it (the multipliers compare against it)"
            )
        if self.num_clients < 1:
            raise ValueError(f"num-clients must be >= 1, got {self.num_clients}")
        if isinstance(self.target, str) and self.target not in ("final", "best"):
            raise ValueError(f"target must be 'final', 'best' or a number, got {self.target!r}")
        for key in GRID_KEYS:
            if key in self.overrides or key in self.run_config:
                raise ValueError(
                    f"{key!r} is set by the grid; change study.{key}s instead of the run-config"
                )
        # Fail now, not after an hour of runs, on a bad key or value in any run.
        for run in self.runs():
            run.config()

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudySpec:
        """Read a study file; ``overrides`` are ``--set`` pairs (``study.<key>`` ones change the
        ``[study]`` table, the others the run-config of every run)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {path}")
        with path.open("rb") as handle:
            data = tomllib.load(handle)
        return cls.from_dict(data, overrides, base=path.parent, default_name=path.stem)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
        *,
        base: Path | None = None,
        default_name: str = "study",
    ) -> StudySpec:
        """Build from the parsed TOML (``{"study": {...}, "run-config": {...}}``)."""
        unknown = sorted(set(data) - {"study", "run-config"})
        if unknown:
            raise ValueError(
                f"unknown table(s) {unknown} in the study file; use [study] and [run-config]"
            )
        study = dict(data.get("study", {}))
        run_overrides: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if key.startswith("study."):
                study[key.removeprefix("study.")] = value
            else:
                run_overrides[key] = value
        names = {f.name.replace("_", "-") for f in dataclasses.fields(cls)}
        names -= {"run-config", "overrides"}
        bad = sorted(set(study) - names)
        if bad:
            raise ValueError(f"unknown [study] key(s) {bad}; known: {', '.join(sorted(names))}")
        presets = study.get("presets")
        preset_dir = (
            (base or Path.cwd()) / Path(presets).expanduser() if presets else find_presets()
        )

        def strings(key: str, default: Sequence[Any]) -> tuple[str, ...]:
            value = study.get(key, default)
            return tuple(str(v) for v in ([value] if isinstance(value, str | int) else value))

        seeds = study.get("seeds", [0])
        seeds = [seeds] if isinstance(seeds, int) else seeds
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be integers, got {seeds!r}")
        return cls(
            name=str(study.get("name", default_name)),
            policies=strings("policies", ("none", "qu", "sp", "rt", "ms")),
            cuts=strings("cuts", ("shallow",)),
            seeds=tuple(seeds),
            num_clients=int(study.get("num-clients", 2)),
            baseline=str(study.get("baseline", "none")),
            target=study.get("target", "final"),
            presets=preset_dir.resolve(),
            run_config=dict(data.get("run-config", {})),
            overrides=run_overrides,
        )

    def runs(self) -> list[GridRun]:
        """Every run of the grid, cut by cut, seed by seed, policy by policy."""
        folder = self.presets or find_presets()
        presets = {policy: load_preset(folder, policy) for policy in self.policies}
        return [
            GridRun(
                policy,
                cut,
                seed,
                {**self.run_config, **presets[policy], "cut": cut, "seed": seed, **self.overrides},
            )
            for cut in self.cuts
            for seed in self.seeds
            for policy in self.policies
        ]

    def to_dict(self) -> dict[str, Any]:
        """The study as JSON-able data (written to ``study.json`` next to the results)."""
        return {
            "name": self.name,
            "policies": list(self.policies),
            "cuts": list(self.cuts),
            "seeds": list(self.seeds),
            "num-clients": self.num_clients,
            "baseline": self.baseline,
            "target": self.target,
            "presets": str(self.presets),
            "run-config": self.run_config,
            "overrides": self.overrides,
        }
