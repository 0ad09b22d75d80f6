"""The paper's experiments as grids on the one runner (tune.run_grid), model by model.

    run_reproduction(spec) -> ReproductionOutcome

For every model of the spec, in the order written:
  1. selection: one run (seed 0) per combination of selection.grid, on the selection budget;
     the candidate with the best final validation Rank IC is the model's choice (ties: the
     first written). Only the validation span decides;
  2. the model's runs: seeds 0 .. N-1 with its choice, the base budget; each trial then predicts
     its validation and test splits into <run>/predictions/ (after_trial, on the trial's node);
  3. the tables in results_dir are rewritten (reproduce/tables.py), so results appear model by
     model on a small machine.
The robustness grid (Table 2) for robustness.models, each with its choice, runs through the
robustness job as soon as the last of those models has its runs (so on a small machine Table 2
comes before the Table 1 rows it does not need), and the tables are rewritten once more.

Every step is a grid: a rerun skips finished runs, continues unfinished ones from their latest
checkpoint and retries failed ones (max_failures). A model whose selection is not complete (a
candidate failed every attempt) is reported and its runs wait for the next invocation; nothing
is chosen on incomplete evidence. Run folders: <storage_path>/<name>-<model>-select/,
<storage_path>/<name>-<model>/, <storage_path>/<name>-robustness/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fvae_dist.config import ExperimentConfig, with_overrides, write_text_atomic
from fvae_dist.data.shards import load_manifest
from fvae_dist.reproduce.spec import ReproductionSpec
from fvae_dist.storage import location
from fvae_dist.tune import run_grid
from fvae_dist.tune.results import read_metrics

SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class PredictSplits:
    """after_trial of a model's runs: predict `splits` with the best epoch's weights."""

    splits: tuple[str, ...] = ("valid", "test")

    def __call__(self, name: str, cfg: ExperimentConfig) -> dict:
        from fvae_dist.train.predict import predict_split

        run_dir = cfg.run_dir  # a path or a storage URI
        # one thread: the trial actor holds a sliver of a CPU beside the next run's workers
        return {split: str(predict_split(run_dir, split, threads=1)) for split in self.splits}


@dataclass
class ModelProgress:
    key: str
    choice: dict | None = None  # the selected values (None: selection not complete)
    selection: dict = field(default_factory=dict)  # candidate trial -> valid Rank IC (None: not done)
    runs: dict = field(default_factory=dict)  # trial name -> run folder, finished runs only
    pending: list = field(default_factory=list)


@dataclass
class ReproductionOutcome:
    models: dict[str, ModelProgress]
    robustness: Any = None
    wall_s: float = 0.0
    files: dict = field(default_factory=dict)


def candidate_name(key: str, candidate: Mapping[str, Any]) -> str:
    """A stable trial name for a selection candidate: model key + its values."""
    parts = [f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in candidate.items()]
    return "-".join([key, *parts]) if parts else key


def _slug(value: Any) -> str:
    return str(value).replace(".", "p").replace("-", "m").replace("+", "")


def selection_trials(spec: ReproductionSpec, key: str) -> dict[str, ExperimentConfig]:
    base = spec.model_config(key)
    return {candidate_name(key, c): with_overrides(base, {**spec.selection.overrides, **c, "train.seed": base.train.seed})
            for c in spec.selection.candidates()}


def model_trials(spec: ReproductionSpec, key: str, choice: Mapping[str, Any]) -> dict[str, ExperimentConfig]:
    cfg = spec.model_config(key, choice)
    return {f"{key}-seed{k}": with_overrides(cfg, {"train.seed": cfg.train.seed + k}) for k in range(spec.model(key).seeds)}


def choose(spec: ReproductionSpec, key: str, outcome) -> ModelProgress:
    """The candidate with the best final validation Rank IC, once every candidate finished."""
    progress = ModelProgress(key)
    candidates = spec.selection.candidates()
    best, best_score = None, None
    for candidate in candidates:
        name = candidate_name(key, candidate)
        trial = outcome.trials[name]
        score = _valid_rank_ic(trial.run_dir) if trial.status == "ok" else None
        progress.selection[name] = score
        if score is not None and (best_score is None or score > best_score):
            best, best_score = candidate, score
    if all(score is not None for score in progress.selection.values()):
        progress.choice = dict(best or {})
    return progress


def _valid_rank_ic(run_dir: Path) -> float | None:
    final = (read_metrics(run_dir).get("final") or {}).get("valid") or {}
    value = final.get("rank_ic")
    return float(value) if isinstance(value, (int, float)) else None


def run_reproduction(spec: ReproductionSpec, *, log: Callable[[str], None] = print,
                     model_builder: Callable | None = None, tables: bool = True) -> ReproductionOutcome:
    from fvae_dist.reproduce.tables import write_tables

    started = time.perf_counter()
    load_manifest(spec.base.data.dataset_dir)  # a DataError naming the folder before anything runs
    outcome = ReproductionOutcome(models={})
    grid_args = dict(max_concurrent=spec.max_concurrent, max_failures=spec.max_failures,
                     model_builder=model_builder, log=log)
    for row in spec.models:
        key = row.key
        log(f"reproduce: {key}: selection over {len(spec.selection.candidates())} candidate(s) on the validation span")
        selected = run_grid(f"{spec.name}-{key}-select", spec.storage_path, selection_trials(spec, key), **grid_args)
        progress = choose(spec, key, selected)
        outcome.models[key] = progress
        _write_selection(spec, outcome)
        if selected.interrupted:
            return _interrupted(outcome, started, log)
        if progress.choice is None:
            log(f"reproduce: {key}: selection incomplete ({sum(v is None for v in progress.selection.values())} "
                "candidate(s) without a result); its runs wait for the next invocation")
            continue
        log(f"reproduce: {key}: chose {progress.choice or 'the base settings'}; {row.seeds} run(s)")
        runs = run_grid(f"{spec.name}-{key}", spec.storage_path, model_trials(spec, key, progress.choice),
                        after_trial=PredictSplits(), **grid_args)
        progress.runs = {name: str(trial.run_dir) for name, trial in runs.trials.items() if trial.status == "ok"}
        progress.pending = [name for name, trial in runs.trials.items() if trial.status != "ok"]
        if tables:
            outcome.files = write_tables(spec, outcome, log=log)
        if runs.interrupted:
            return _interrupted(outcome, started, log)
        if outcome.robustness is None and _robustness_models_done(spec, outcome):
            outcome.robustness = _robustness(spec, outcome, model_builder, log)
            if tables:
                outcome.files = write_tables(spec, outcome, log=log)
            if outcome.robustness is not None and outcome.robustness.pending:
                return _interrupted(outcome, started, log)

    if outcome.robustness is None and spec.robustness.models and spec.robustness.ms:
        # some of its models are not finished (a failed selection or run): what is ready runs now
        outcome.robustness = _robustness(spec, outcome, model_builder, log)
        if tables:
            outcome.files = write_tables(spec, outcome, log=log)
    outcome.wall_s = time.perf_counter() - started
    return outcome


def _robustness_models_done(spec: ReproductionSpec, outcome: ReproductionOutcome) -> bool:
    """Whether every model of Table 2 has its choice and all its runs: Table 2 can run now."""
    if not (spec.robustness.models and spec.robustness.ms):
        return False
    return all(outcome.models.get(key) is not None and outcome.models[key].choice is not None
               and outcome.models[key].runs and not outcome.models[key].pending for key in spec.robustness.models)


def _interrupted(outcome: ReproductionOutcome, started: float, log) -> ReproductionOutcome:
    """Ctrl+C stopped a grid: stop here rather than start the next model's grid (a second Ctrl+C
    would be needed for each)."""
    log("reproduce: interrupted; the same command continues from here")
    outcome.wall_s = time.perf_counter() - started
    return outcome


def _robustness(spec: ReproductionSpec, outcome: ReproductionOutcome, model_builder, log):
    from fvae_dist.robustness import run_robustness

    ready = [key for key in spec.robustness.models if outcome.models.get(key) and outcome.models[key].choice is not None]
    if not ready:
        log("reproduce: robustness waits for its models' selections")
        return None
    per_model = {key: {**spec.model(key).overrides, **outcome.models[key].choice} for key in ready}
    return run_robustness(spec.base, models=ready, ms=spec.robustness.ms, seeds=spec.robustness.seeds,
                          out_dir=_join(spec.storage_path, f"{spec.name}-robustness"), max_parallel=spec.max_concurrent,
                          retries=spec.max_failures, model_builder=model_builder, log=log, model_overrides=per_model)


def _join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _write_selection(spec: ReproductionSpec, outcome: ReproductionOutcome) -> None:
    document = {key: {"choice": p.choice, "valid_rank_ic": p.selection} for key, p in outcome.models.items()}
    path = spec.results_dir / SELECTION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")


def finished_so_far(spec: ReproductionSpec) -> ReproductionOutcome:
    """The outcome the runs on disk give, without starting anything (`--tables-only`)."""
    from fvae_dist.robustness import ROBUSTNESS_DIR, read_results
    from fvae_dist.tune.grid import read_record
    from fvae_dist.tune.run import experiment_dir

    outcome = ReproductionOutcome(models={})
    for row in spec.models:
        folder = experiment_dir(spec.storage_path, f"{spec.name}-{row.key}-select")
        trials = {name: _Finished(folder / name, read_record(folder / name).get("status"))
                  for name in selection_trials(spec, row.key)}
        progress = choose(spec, row.key, _Trials(trials))
        outcome.models[row.key] = progress
        if progress.choice is None:
            continue
        folder = experiment_dir(spec.storage_path, f"{spec.name}-{row.key}")
        for name in model_trials(spec, row.key, progress.choice):
            done = read_record(folder / name).get("status") == "ok"
            (progress.runs.__setitem__(name, str(folder / name)) if done else progress.pending.append(name))
    results = location(_join(spec.storage_path, f"{spec.name}-robustness")) / ROBUSTNESS_DIR / "results.csv"
    if results.is_file():
        outcome.robustness = _RobustnessResults(read_results(results))
    return outcome


@dataclass
class _Finished:
    run_dir: Path
    status: str | None


@dataclass
class _Trials:
    trials: dict


@dataclass
class _RobustnessResults:
    results: Any
