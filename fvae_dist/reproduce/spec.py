"""The reproduction YAML (tune_configs/reproduce_paper.yaml) as checked dataclasses, without Ray.

    load_reproduction(path, overrides) -> ReproductionSpec

Sections (paths relative to the YAML file's folder's parent, i.e. the repository root, unless
absolute):

    name, storage_path, results_dir      where the grids' run folders go (not committed) and where
                                         the tables, CSV and PNG go (committed, docs/results/)
    base:       train preset every run starts from, plus overrides
    data:       dataset_dir (prepared beforehand with `fvae-dist prepare`), membership (each day's
                index members: the second scoring and the portfolio universe), bars and benchmark
                (the backtest's prices and index)
    models:     {key: {seeds: N, overrides: {...}}}: the rows of Table 1; keys as the
                robustness job's (fvae_dist.robustness.MODELS): factorvae, prior, port, linear, ...
    selection:  the choices made on the validation span, per model: every combination of
                `grid` (e.g. train.lr: [...]) trained once (seed 0) with `overrides` (a shorter
                budget), the best final validation Rank IC wins and its values go into that
                model's runs. Every model gets the same grid: the same tuning effort.
    robustness: {m: [...], seeds: N, models: [...]}  Table 2 (empty `models`: skipped)
    backtest:   {topk, n_drop, etas: [...]}           Table 3; TDrisk's eta chosen per run on validation
    ensembles:  [model keys]                          seed-ensemble rows (mean of the seeds' predictions)
    max_concurrent, max_failures                      as for every grid (tune.run_grid)
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fvae_dist.config import ExperimentConfig, load_config, parse_override, read_yaml_mapping, with_overrides
from fvae_dist.errors import ConfigError, nearest_name_hint

SECTIONS = ("name", "storage_path", "results_dir", "base", "data", "models", "selection", "robustness",
            "backtest", "ensembles", "max_concurrent", "max_failures")


@dataclass(frozen=True)
class ModelRow:
    key: str                      # robustness.MODELS key: factorvae, prior, port, linear, ca, ...
    seeds: int
    overrides: Mapping[str, Any]  # the model's own settings on top of the base (model.name, ...)


@dataclass(frozen=True)
class Selection:
    grid: Mapping[str, tuple]     # dotted key -> candidate values
    overrides: Mapping[str, Any]  # the selection runs' budget (e.g. fewer epochs)

    def candidates(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass(frozen=True)
class RobustnessPlan:
    ms: tuple[int, ...] = ()
    seeds: int = 1
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class BacktestPlan:
    topk: int = 50
    n_drop: int = 5
    etas: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    benchmark_code: str = "SH000300"


@dataclass(frozen=True)
class ReproductionSpec:
    source: str                   # the YAML file
    name: str
    storage_path: str               # a folder, or a URI such as s3://bucket/reproduce
    results_dir: Path
    base: ExperimentConfig
    membership: Path
    bars: str                       # a long table, a Qlib directory or a synthetic: spec
    benchmark: Path
    models: tuple[ModelRow, ...]
    selection: Selection
    robustness: RobustnessPlan
    backtest: BacktestPlan
    ensembles: tuple[str, ...] = ()
    max_concurrent: int = 0
    max_failures: int = 1
    raw: dict = field(default_factory=dict, compare=False)  # the YAML as read (reproduce.json)

    def model(self, key: str) -> ModelRow:
        return next(row for row in self.models if row.key == key)

    def model_config(self, key: str, chosen: Mapping[str, Any] = ()) -> ExperimentConfig:
        """The base with the model's overrides and the values selection chose for it."""
        return with_overrides(self.base, {**self.model(key).overrides, **dict(chosen)})


def load_reproduction(path: str | Path, overrides: Sequence[str] = ()) -> ReproductionSpec:
    """Read and check the YAML; `overrides` are key=value on its top-level scalars
    (e.g. max_concurrent=4, storage_path=s3://bucket/reproduce)."""
    path = Path(path)
    raw = read_yaml_mapping(path, what="reproduction file", sections=SECTIONS)
    for text in overrides:
        key, value = parse_override(text)
        if key not in ("name", "storage_path", "results_dir", "max_concurrent", "max_failures"):
            raise ConfigError(f"override {text!r}: only name, storage_path, results_dir, max_concurrent and "
                              "max_failures can be overridden on the command line")
        raw[key] = value
    return spec_from_dict(raw, source=str(path), root=path.resolve().parent.parent)


def spec_from_dict(raw: Mapping, *, source: str, root: Path) -> ReproductionSpec:
    from fvae_dist.robustness import MODELS

    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}{nearest_name_hint(unknown[0], SECTIONS)}")
    resolve = lambda value: Path(value) if Path(str(value)).is_absolute() else root / str(value)  # noqa: E731

    base_raw = _mapping(raw.get("base"), f"{source}: base")
    if "config" not in base_raw:
        raise ConfigError(f"{source}: base.config: expected the train preset every run starts from")
    base = load_config(resolve(base_raw["config"]), [f"{k}={v}" for k, v in _mapping(base_raw.get("overrides"),
                                                                                     f"{source}: base.overrides").items()])
    data = _mapping(raw.get("data"), f"{source}: data")
    for key in ("membership", "bars", "benchmark"):
        if key not in data:
            raise ConfigError(f"{source}: data.{key}: expected a path (see the file's header)")
    if "dataset_dir" in data:
        base = with_overrides(base, {"data.dataset_dir": str(resolve(data["dataset_dir"]))})

    models_raw = _mapping(raw.get("models"), f"{source}: models")
    if not models_raw:
        raise ConfigError(f"{source}: models: expected at least one model")
    rows = []
    for key, entry in models_raw.items():
        if key not in MODELS:
            raise ConfigError(f"{source}: models.{key}: unknown model{nearest_name_hint(str(key), MODELS)}; "
                              f"expected one of {sorted(MODELS)}")
        entry = _mapping(entry, f"{source}: models.{key}")
        seeds = int(entry.get("seeds", 1))
        if seeds < 1:
            raise ConfigError(f"{source}: models.{key}.seeds: expected an integer >= 1, got {seeds}")
        overrides = {**MODELS[key].overrides, **_mapping(entry.get("overrides"), f"{source}: models.{key}.overrides")}
        with_overrides(base, overrides)  # every model's config must be valid before anything runs
        rows.append(ModelRow(key, seeds, overrides))

    selection_raw = _mapping(raw.get("selection"), f"{source}: selection")
    grid = {key: tuple(values if isinstance(values, list) else [values])
            for key, values in _mapping(selection_raw.get("grid"), f"{source}: selection.grid").items()}
    selection = Selection(grid, dict(_mapping(selection_raw.get("overrides"), f"{source}: selection.overrides")))
    for candidate in selection.candidates():
        with_overrides(base, {**selection.overrides, **candidate})  # names and values checked here

    rob = _mapping(raw.get("robustness"), f"{source}: robustness")
    robustness = RobustnessPlan(tuple(int(m) for m in rob.get("m", ())), int(rob.get("seeds", 1)),
                                tuple(rob.get("models", ())))
    for key in robustness.models:
        if key not in {row.key for row in rows}:
            raise ConfigError(f"{source}: robustness.models: {key!r} is not one of the models section's keys")
    bt = _mapping(raw.get("backtest"), f"{source}: backtest")
    backtest = BacktestPlan(**{k: (tuple(v) if k == "etas" else v) for k, v in bt.items()
                               if k in {f.name for f in dataclasses.fields(BacktestPlan)}})
    ensembles = tuple(raw.get("ensembles") or ())
    for key in ensembles:
        if key not in {row.key for row in rows} or dict((r.key, r.seeds) for r in rows)[key] < 2:
            raise ConfigError(f"{source}: ensembles: {key!r} needs to be a model with seeds >= 2")
    return ReproductionSpec(
        source=source, name=str(raw.get("name") or "reproduce"),
        storage_path=_location(raw.get("storage_path") or "runs/reproduce", resolve),
        results_dir=resolve(raw.get("results_dir") or "docs/results"),
        base=base, membership=resolve(data["membership"]), bars=_bars(data["bars"], resolve),
        benchmark=resolve(data["benchmark"]), models=tuple(rows), selection=selection,
        robustness=robustness, backtest=backtest, ensembles=ensembles,
        max_concurrent=int(raw.get("max_concurrent", 0)), max_failures=int(raw.get("max_failures", 1)),
        raw=dict(raw),
    )


def _bars(value: Any, resolve) -> str:
    """A bar source as `--source` takes it: a synthetic: spec as written, a path resolved."""
    return str(value) if str(value).startswith("synthetic") else str(resolve(value))


def _location(value: Any, resolve) -> str:
    """A URI (scheme://...) as written; a path resolved against the repository root."""
    return str(value) if "://" in str(value) else str(resolve(value))


def _mapping(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value
