"""The robustness experiment (the paper's Experiment 2, Table 2): how well a model predicts
stocks it never saw in training.

For every (model, m, seed): draw m stocks at random from those present in the test span, remove
them from the training and validation data entirely (data.exclude_instruments), train, predict
the whole test span (the held-out stocks among all the others, as in the paper: "predict the
stock returns on the test dataset and select the predicted returns of these m stocks") and score
Rank IC and Rank ICIR on the m held-out stocks only.

The draws are nested: for one seed, the m=50 stocks are the first 50 of the same random order
whose first 100 are the m=100 stocks. Differences between the m columns then come from m, not
from which stocks happened to be drawn. Every model sees the same held-out stocks per (m, seed).

Normalisation. The features are RobustZScore-normalised with statistics fitted on the training
span. Fitted on the config's data set (data.dataset_dir), those statistics include the held-out
stocks' training-span features, so the held-out stocks would still shape the inputs the model is
trained on. By default the job therefore prepares, per (m, seed), a data set from the same source
and settings as data.dataset_dir (read from its manifest) whose statistics are fitted WITHOUT that
(m, seed)'s held-out stocks, into data/m<m>-seed<s>/, shared by all models of that (m, seed). The
shards still hold the held-out stocks, so the test span is predicted for them. These prepares run
one after another in the driver before any run starts (each already uses the machine's cores
through Arrow and holds a bounded, but not small, amount of memory; running several at once would
contend for both with nothing to gain before the runs can start). They cost one normal `fvae-dist
prepare` each in time and disk; a re-run reuses them without opening the source. The source recorded in the
manifest must still be readable.

`reuse_normalisation=True` (`--reuse-normalisation`) trains every run on data.dataset_dir itself:
faster and no extra disk, but the statistics then saw the held-out stocks. With m small next to
the stocks of the training span the effect on a median/MAD is small, yet it leaks the held-out
stocks' training-span feature distribution into the model's inputs, so the scores are not strictly
those of never-seen stocks.

Layout under <out>/robustness/ (paths inside results.csv are relative to that folder):
    held_out/m<m>-seed<s>.txt      the drawn stocks, one per line
    data/m<m>-seed<s>/             the data set of that draw, normalisation fitted without it
    runs/                          the grid's Tune experiment (tune/grid.py)
    runs/<model>-m<m>-seed<s>/     a trial: an ordinary run folder (config.yaml, metrics.json,
                                   checkpoints, predictions/test.parquet), Tune's files, trial.json
                                   (the grid's record) and robustness.json, its result
    results.csv                    one row per run (model, m, seed, rank_ic, rank_icir, n_days,
                                   status, ...); `fvae-dist report` reads it for Table 2
    table2.md, table2.csv          Table 2: mean (std) over seeds per model and m
    job.json                       wall time (prepares and runs), parallelism and run counts of the
                                   last invocation

Execution: the runs are one grid of named trials, tune.run_grid: a Ray Tune experiment whose
trials each fit the same TorchTrainer as `fvae-dist train`, then (inside the trial) predict the
test span and score the held-out stocks. At most `max_parallel` run at once, never more than
the cluster fits with one CPU left to Ray Data. A failed run is started again by Tune
(FailureConfig; it resumes from its last checkpoint) up to `retries` times and is then recorded
as failed, never dropped. Starting the job again keeps the finished runs, continues an
interrupted one from its checkpoint and retries the failed ones.

Note: metrics.json's "final" test metrics of these runs are on the NOT held-out stocks (the
exclusion applies to every split during training); the held-out scores live in robustness.json.
"""
from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from fvae_dist.config import ExperimentConfig, json_safe, with_overrides, write_text_atomic
from fvae_dist.storage import UriPath, is_uri, location
from fvae_dist.data.reopen import open_manifest_source, prepare_like
from fvae_dist.data.shards import load_manifest, manifest_hash, read_shard_table, shard_entries
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, summarize_ic
from fvae_dist.evaluate.report import table2
from fvae_dist.models.factorvae import VARIANTS
from fvae_dist.models.registry import MODEL_NAMES, model_label
from fvae_dist.tune.grid import read_record, run_grid

ROBUSTNESS_DIR = "robustness"
RUNS_DIR = "runs"  # the grid's experiment folder under robustness/
RESULT_FILE = "robustness.json"
TABLE2_NOTE = ("Rank IC / Rank ICIR of the test-span predictions on the m stocks held out of training and validation; "
               "mean (std, ddof=1) over seeds. [k of n failed] marks runs that failed after their retries "
               "(see results.csv).")
RESULTS_COLUMNS = [
    "model", "m", "seed", "rank_ic", "rank_icir", "ic", "icir", "n_days", "n_stocks",
    "status", "attempts", "wall_s", "error", "model_key", "run_dir", "held_out_file",
]


@dataclass(frozen=True)
class ModelChoice:
    """A row of Table 2: its label and the config overrides that select it."""

    label: str
    overrides: Mapping[str, Any]


# Table 2's rows: FactorVAE's variants (keyed by variant) and the paper's baselines (by name).
MODELS: dict[str, ModelChoice] = {
    **{variant: ModelChoice(model_label("factorvae", variant), {"model.name": "factorvae", "model.variant": variant})
       for variant in VARIANTS},
    **{name: ModelChoice(model_label(name), {"model.name": name}) for name in MODEL_NAMES if name != "factorvae"},
}


@dataclass(frozen=True)
class RunSpec:
    model: str  # key of MODELS
    m: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-m{self.m}-seed{self.seed}"


@dataclass
class RobustnessPaths:
    root: "Path | UriPath"  # <out>/robustness: a folder, or a storage URI's
    data_root: Path | None = None
    """Where the held-out data sets go: <root>/data, or, when root is a URI, a folder beside the
    source data set (data sets are read from a directory every node sees, as data.dataset_dir is)."""

    @property
    def runs(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    def held_out_file(self, m: int, seed: int) -> Path:
        return self.root / "held_out" / f"m{m}-seed{seed}.txt"

    def data_dir(self, m: int, seed: int) -> Path:
        return (self.data_root or self.root / "data") / f"m{m}-seed{seed}"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs / spec.name


@dataclass
class JobSummary:
    results: pd.DataFrame
    ran: int
    skipped: int
    failed: int
    pending: int  # not finished: the job was interrupted
    wall_s: float
    max_parallel: int
    paths: RobustnessPaths
    files: dict = field(default_factory=dict)  # name -> written path


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

def resolve_models(names: Sequence[str]) -> list[str]:
    """Validate model names (duplicates dropped, order kept)."""
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown model(s) {unknown}; this package can train {sorted(MODELS)}")
    if not names:
        raise ConfigError(f"--models: give at least one of {sorted(MODELS)}")
    return list(dict.fromkeys(names))


def scorable_instruments(dataset_dir: str | Path, split: str) -> list[str]:
    """Stocks that can be scored in the split: in the universe with a finite label on at least
    one of the split's own days (halo days before the split do not count)."""
    manifest = load_manifest(dataset_dir)
    found: set[str] = set()
    for entry in shard_entries(manifest, split):
        table = read_shard_table(location(dataset_dir) / entry["path"], ["date", "instrument", "in_universe", "label"])
        frame = table.to_pandas()
        dates = frame["date"].to_numpy(dtype="datetime64[D]")
        own = (dates >= np.datetime64(entry["own_start"], "D")) & (dates <= np.datetime64(entry["own_end"], "D"))
        keep = own & frame["in_universe"].to_numpy(dtype=bool) & np.isfinite(frame["label"].to_numpy(dtype=np.float64))
        found.update(frame.loc[keep, "instrument"].astype(str))
    return sorted(found)


def draw_held_out(instruments: Sequence[str], m: int, seed: int) -> list[str]:
    """m stocks drawn without replacement; for one seed a smaller m is a prefix of a larger one's draw."""
    pool = sorted(set(instruments))
    if not 2 <= m <= len(pool):
        raise ConfigError(f"--m {m}: expected 2 <= m <= {len(pool)} (the stocks present in the test split; "
                          "a daily Rank IC needs at least 2)")
    order = np.random.default_rng(seed).permutation(len(pool))
    return sorted(pool[i] for i in order[:m])


def run_config(cfg: ExperimentConfig, spec: RunSpec, held_out: Sequence[str],
               dataset_dir: str | Path | None = None, model_overrides: Mapping[str, Any] = ()) -> ExperimentConfig:
    """The config of one run: the model (and `model_overrides`, its own settings such as a
    learning rate chosen on validation), the held-out stocks, the seed and, when given, the data
    set of its (m, seed). The grid puts it in its own run folder, runs/<spec.name>."""
    data = {} if dataset_dir is None else {"data.dataset_dir": str(dataset_dir)}
    return with_overrides(cfg, {
        **MODELS[spec.model].overrides,
        **dict(model_overrides),
        **data,
        "data.exclude_instruments": sorted(held_out),
        "train.seed": cfg.train.seed + spec.seed,
    })


# ----------------------------------------------------------------------------------------------
# One run (inside its grid trial)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldOutScoring:
    """What a grid trial does once its Train run has finished: predict the whole test split and
    score the run's held-out stocks (tune.run_grid's after_trial)."""

    held_out: Mapping[str, Sequence[str]]  # run name -> its held-out stocks

    def __call__(self, name: str, cfg: ExperimentConfig) -> dict:
        from fvae_dist.train.predict import predict_split

        # predict_split scores every stock of the split, held-out ones included; one thread because
        # the trial holds a sliver of a CPU and other runs' workers may be busy beside it
        path = predict_split(cfg.run_dir.expanduser().resolve(), cfg.data.test_split, threads=1)
        return score_held_out(read_predictions(path), self.held_out[name])


def score_held_out(predictions: pd.DataFrame, held_out: Sequence[str]) -> dict:
    """Rank IC / Rank ICIR (and IC / ICIR) of mu against the label over the held-out stocks only."""
    held = set(held_out)
    subset = predictions[predictions["instrument"].isin(held)]
    missing = held - set(subset["instrument"])
    if missing:
        raise DataError(f"predictions lack {len(missing)} held-out stock(s), e.g. {sorted(missing)[:3]}; "
                        "the test split must be predicted without the run's data.exclude_instruments")
    summary = summarize_ic(daily_ic(subset, score="mu", label="label"))
    return {
        "rank_ic": summary["rank_ic"],
        "rank_icir": summary["rank_icir"],
        "ic": summary["ic"],
        "icir": summary["icir"],
        "n_days": summary["n_days"],
        "n_stocks": int(subset["instrument"].nunique()),
    }


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

def run_robustness(
    cfg: ExperimentConfig,
    *,
    models: Sequence[str],
    ms: Sequence[int],
    seeds: int,
    out_dir: str | Path,
    max_parallel: int = 0,
    retries: int = 1,
    model_builder: Callable | None = None,
    log: Callable[[str], None] = print,
    reuse_normalisation: bool = False,
    scoring: Callable[[Mapping[str, Sequence[str]]], Callable] = HeldOutScoring,
    model_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> JobSummary:
    """Run the grid models x ms x range(seeds); return the results table and counts.

    max_parallel: runs at once; 0 = as many as the cluster fits (always capped there).
    retries: times a failed run is started again before it is recorded as failed.
    reuse_normalisation: train every run on data.dataset_dir instead of a data set per (m, seed)
            whose normalisation is fitted without its held-out stocks (faster; see the module doc).
    model_builder, scoring: seams for tests (a model builder run in the Train workers; what
            makes the after-fit step from the held-out stocks by run name).
    model_overrides: per model key, settings of its own on top of cfg (`fvae-dist reproduce`
            passes each model's validation-chosen values)."""
    started = time.perf_counter()
    models = resolve_models(models)
    ms = list(dict.fromkeys(int(m) for m in ms))
    if not ms:
        raise ConfigError("--m: give at least one number of held-out stocks")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected an integer >= 1 (the runs use seeds 0 .. seeds-1)")
    if retries < 0:
        raise ConfigError(f"--retries {retries}: expected an integer >= 0")
    if max_parallel < 0:
        raise ConfigError(f"--max-parallel {max_parallel}: expected an integer >= 0 (0 = as many as fit)")
    if not cfg.data.dataset_dir:
        raise ConfigError("data.dataset_dir is empty: set it in the config file or pass data.dataset_dir=DIR")
    dataset_dir = Path(cfg.data.dataset_dir).expanduser().resolve()
    base_hash = manifest_hash(dataset_dir)
    if cfg.data.exclude_instruments:
        raise ConfigError("data.exclude_instruments is set in the config; the robustness job chooses the "
                          "held-out stocks itself, leave it empty")

    root = location(out_dir) / ROBUSTNESS_DIR
    paths = RobustnessPaths(root, dataset_dir.with_name(f"{dataset_dir.name}-held-out") if is_uri(root) else None)
    pool = scorable_instruments(dataset_dir, cfg.data.test_split)
    held_out: dict[tuple[int, int], list[str]] = {}
    for m in ms:
        for seed in range(seeds):
            held_out[m, seed] = draw_held_out(pool, m, seed)
            write_text_atomic(paths.held_out_file(m, seed), "\n".join(held_out[m, seed]) + "\n")

    if reuse_normalisation:
        datasets = {key: None for key in held_out}
        prepares = {"normalisation": "shared: fitted on data.dataset_dir, held-out stocks included "
                    "(--reuse-normalisation)", "wall_s": 0.0}
    else:
        datasets, prepares = prepare_held_out_datasets(dataset_dir, paths, held_out, log)

    specs = [RunSpec(model, m, seed) for model in models for m in ms for seed in range(seeds)]
    configs = {spec.name: run_config(cfg, spec, held_out[spec.m, spec.seed], datasets[spec.m, spec.seed],
                                     (model_overrides or {}).get(spec.model, {}))
               for spec in specs}
    tables = ResultTables(paths, specs, held_out, log)
    outcome = run_grid(RUNS_DIR, paths.root, configs, max_concurrent=max_parallel, max_failures=retries,
                       after_trial=scoring({spec.name: held_out[spec.m, spec.seed] for spec in specs}),
                       on_update=tables.write, model_builder=model_builder, log=log)
    wall = time.perf_counter() - started
    ran, failed = len(outcome.ran), len(outcome.failed)
    job = {"wall_s": wall, "max_parallel": outcome.concurrency, "runs": len(specs), "ran": ran,
           "skipped": len(specs) - ran, "failed": failed, "pending": len(outcome.pending), "retries": retries,
           "models": models, "m": ms, "seeds": seeds, "dataset_dir": str(dataset_dir), "manifest_hash": base_hash,
           "prepare": prepares}
    write_text_atomic(paths.root / "job.json", json.dumps(job, indent=1) + "\n")
    log(f"robustness: {len(specs)} runs ({len(models)} models x m={ms} x {seeds} seeds): {len(specs) - ran} "
        f"finished before, {ran} run now (at most {outcome.concurrency} at once) in {wall:.1f} s; {failed} failed; "
        f"{tables.files['table2_md']}")
    return JobSummary(results=read_results(paths.results_csv), ran=ran, skipped=len(specs) - ran, failed=failed,
                      pending=len(outcome.pending), wall_s=wall, max_parallel=outcome.concurrency, paths=paths, files=tables.files)


def prepare_held_out_datasets(dataset_dir: Path, paths: RobustnessPaths,
                              held_out: Mapping[tuple[int, int], Sequence[str]],
                              log: Callable[[str], None] = print) -> tuple[dict[tuple[int, int], Path], dict]:
    """One data set per (m, seed) from dataset_dir's source and settings, its normalisation fitted
    without that draw's held-out stocks; returns their folders and what the prepares cost (job.json).

    One after another in the driver (see the module doc); the source is opened at most once, and
    not at all when every data set is already up to date."""
    opener = functools.cache(lambda: open_manifest_source(dataset_dir))
    folders: dict[tuple[int, int], Path] = {}
    costs: dict[str, dict] = {}
    started = time.perf_counter()
    for k, ((m, seed), stocks) in enumerate(held_out.items(), 1):
        folder = paths.data_dir(m, seed)
        begun = time.perf_counter()
        try:
            result = prepare_like(dataset_dir, folder, fit_exclude_instruments=stocks, source_opener=opener)
        except ConfigError as exc:
            raise ConfigError(f"{exc}. The held-out data sets are prepared from that source; to train every run "
                              f"on {dataset_dir} as it is (normalisation fitted with the held-out stocks) pass "
                              "--reuse-normalisation") from exc
        wall = time.perf_counter() - begun
        folders[m, seed] = folder
        shard_bytes = int(result.manifest.get("disk", {}).get("shard_bytes", 0))
        where = str(folder.relative_to(paths.root)) if paths.data_root is None else str(folder)
        costs[folder.name] = {"path": where, "reused": result.reused,
                              "wall_s": round(wall, 3), "shard_bytes": shard_bytes}
        log(f"robustness: data set {k}/{len(held_out)} {folder.name} (normalisation without its {len(stocks)} "
            f"held-out stocks): {'up to date' if result.reused else f'prepared in {wall:.1f} s'}, "
            f"{shard_bytes / 1e6:.1f} MB")
    built = [cost for cost in costs.values() if not cost["reused"]]
    summary = {"normalisation": "fitted per (m, seed) without its held-out stocks",
               "wall_s": round(time.perf_counter() - started, 3), "prepared": len(built),
               "reused": len(costs) - len(built), "shard_bytes": sum(cost["shard_bytes"] for cost in costs.values()),
               "datasets": costs}
    return folders, summary


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

class ResultTables:
    """robustness.json per finished run, results.csv (every run of the grid; unfinished ones as
    "pending") and Table 2 (md, csv), rewritten from the grid's outcome whenever a run ends."""

    def __init__(self, paths: RobustnessPaths, specs: Sequence[RunSpec],
                 held_out: Mapping[tuple[int, int], Sequence[str]], log: Callable[[str], None] = print):
        self.paths, self.specs, self.held_out, self.log = paths, list(specs), held_out, log
        self.files = {"results_csv": paths.results_csv, "table2_md": paths.root / "table2.md",
                      "table2_csv": paths.root / "table2.csv"}
        self._told: dict[str, tuple] = {}

    def write(self, outcome) -> None:
        rows = []
        for spec in self.specs:
            trial = outcome.trials[spec.name]
            record = self.record(spec, trial, read_record(trial.run_dir).get("config") or {})
            if trial.status != "pending":
                write_text_atomic(trial.run_dir / RESULT_FILE, json.dumps(json_safe(record), indent=1) + "\n")
                self._tell(spec, trial)
            rows.append({column: record.get(column) for column in RESULTS_COLUMNS})
        results = pd.DataFrame(rows, columns=RESULTS_COLUMNS)
        write_text_atomic(self.paths.results_csv, results.to_csv(index=False))
        text, table = table2(results)
        write_text_atomic(self.files["table2_md"], text + "\n\n" + TABLE2_NOTE + "\n")
        write_text_atomic(self.files["table2_csv"], table.to_csv(index=False))

    def record(self, spec: RunSpec, trial, fingerprint: Mapping) -> dict:
        """What robustness.json and the run's row of results.csv say about it."""
        return {
            "model": MODELS[spec.model].label,
            "model_key": spec.model,
            "m": spec.m,
            "seed": spec.seed,
            "status": trial.status,
            "attempts": trial.attempts,
            "wall_s": trial.wall_s,
            "error": trial.error,
            "run_dir": str(trial.run_dir.relative_to(self.paths.root)),
            "held_out_file": str(self.paths.held_out_file(spec.m, spec.seed).relative_to(self.paths.root)),
            "held_out": list(self.held_out[spec.m, spec.seed]),
            "manifest_hash": fingerprint.get("manifest_hash"),
            "config": fingerprint.get("config"),
            **trial.result,
        }

    def _tell(self, spec: RunSpec, trial) -> None:
        said = (trial.status, trial.attempts)
        if self._told.get(spec.name) == said:
            return
        self._told[spec.name] = said
        if trial.status == "ok":
            self.log(f"robustness: {spec.name} rank_ic={trial.result.get('rank_ic', float('nan')):.4f} "
                     f"rank_icir={trial.result.get('rank_icir', float('nan')):.4f}")
        else:
            self.log(f"robustness: {spec.name} FAILED after {trial.attempts} attempt(s): {trial.error}")


def read_results(path) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(location(path).read_text()), keep_default_na=True)
