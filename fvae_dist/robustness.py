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
prepare` each in time and disk (CSI300 2010-2020, m=50: 9-19 s on 2 busy cores and 112 MB per
(m, seed)); a re-run reuses them without opening the source. The source recorded in the
manifest must still be readable.

`reuse_normalisation=True` (`--reuse-normalisation`) trains every run on data.dataset_dir itself:
faster and no extra disk, but the statistics then saw the held-out stocks. With m small next to
the stocks of the training span the effect on a median/MAD is small, yet it leaks the held-out
stocks' training-span feature distribution into the model's inputs, so the scores are not strictly
those of never-seen stocks (CSI300, m=50: medians move by up to ~1% of a feature's scale, scales
by up to ~1%).

Layout under <out>/robustness/ (paths inside results.csv are relative to that folder):
    held_out/m<m>-seed<s>.txt      the drawn stocks, one per line
    data/m<m>-seed<s>/             the data set of that draw, normalisation fitted without it
    runs/<model>-m<m>-seed<s>/     an ordinary run folder (config.yaml, metrics.json, checkpoints,
                                   predictions/test.parquet) plus robustness.json, its result
    results.csv                    one row per run (model, m, seed, rank_ic, rank_icir, n_days,
                                   status, ...); `fvae-dist report` reads it for Table 2
    table2.md, table2.csv          Table 2: mean (std) over seeds per model and m
    job.json                       wall time (prepares and runs), parallelism and run counts of the
                                   last invocation

Execution: each run is one Ray task (zero CPUs of its own: it only drives a TorchTrainer, whose
workers hold the resources) calling the same `train()` as `fvae-dist train`. The driver keeps at
most `max_parallel` runs in flight, never more than the cluster fits with one CPU left to Ray
Data. A failed run is submitted again (it resumes from its last checkpoint) up to `retries`
times and is then recorded as failed, never dropped. A run whose robustness.json says "ok" is
skipped when the job is started again, so an interrupted job continues where it stopped.

Note: metrics.json's "final" test metrics of these runs are on the NOT held-out stocks (the
exclusion applies to every split during training); the held-out scores live in robustness.json.
"""
from __future__ import annotations

import functools
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from fvae_dist.config import ExperimentConfig, config_from_dict, config_to_dict, with_overrides, write_text_atomic
from fvae_dist.data.reopen import open_manifest_source, prepare_like
from fvae_dist.data.shards import load_manifest, manifest_hash, shard_entries
from fvae_dist.errors import ConfigError, DataError, FvaeError
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, summarize_ic
from fvae_dist.evaluate.report import fmt_mean_std, markdown_table, mean_std
from fvae_dist.models.factorvae import VARIANTS
from fvae_dist.models.registry import MODEL_NAMES, model_label
from fvae_dist.train.predict import predict_split
from fvae_dist.train.trainer import ensure_ray, train

ROBUSTNESS_DIR = "robustness"
RESULT_FILE = "robustness.json"
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
    root: Path  # <out>/robustness

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    def held_out_file(self, m: int, seed: int) -> Path:
        return self.root / "held_out" / f"m{m}-seed{seed}.txt"

    def data_dir(self, m: int, seed: int) -> Path:
        return self.root / "data" / f"m{m}-seed{seed}"

    def run_dir(self, spec: RunSpec) -> Path:
        return self.runs / spec.name

    def result_file(self, spec: RunSpec) -> Path:
        return self.run_dir(spec) / RESULT_FILE


@dataclass
class JobSummary:
    results: pd.DataFrame
    ran: int
    skipped: int
    failed: int
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
        table = pq.read_table(Path(dataset_dir) / entry["path"], columns=["date", "instrument", "in_universe", "label"])
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


def run_config(cfg: ExperimentConfig, spec: RunSpec, held_out: Sequence[str], runs_dir: Path,
               dataset_dir: str | Path | None = None) -> ExperimentConfig:
    """The config of one run: the model, the held-out stocks, the seed, its own run folder and,
    when given, the data set of its (m, seed)."""
    data = {} if dataset_dir is None else {"data.dataset_dir": str(dataset_dir)}
    return with_overrides(cfg, {
        **MODELS[spec.model].overrides,
        **data,
        "data.exclude_instruments": sorted(held_out),
        "train.seed": cfg.train.seed + spec.seed,
        "ray.storage_path": str(runs_dir),
        "ray.run_name": spec.name,
    })


# ----------------------------------------------------------------------------------------------
# One run (inside a Ray task)
# ----------------------------------------------------------------------------------------------

def run_one(cfg_dict: dict, spec: RunSpec, held_out: Sequence[str], model_builder: Callable | None = None) -> dict:
    """Train (or resume) one run, predict the whole test split, score the held-out stocks."""
    start = time.perf_counter()
    cfg = config_from_dict(cfg_dict, source=f"robustness run {spec.name}")
    outcome = train(cfg, model_builder=model_builder)
    # predict_split scores every stock of the split, held-out ones included; one thread because
    # this task holds no CPU of its own and other runs' workers may be busy beside it
    path = predict_split(outcome.run_dir, cfg.data.test_split, threads=1)
    scores = score_held_out(read_predictions(path), held_out)
    return {**scores, "wall_s": time.perf_counter() - start}


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
    run_fn: Callable = run_one,
    reuse_normalisation: bool = False,
) -> JobSummary:
    """Run the grid models x ms x range(seeds); return the results table and counts.

    max_parallel: runs in flight at once; 0 = as many as the cluster fits (always capped there).
    reuse_normalisation: train every run on data.dataset_dir instead of a data set per (m, seed)
            whose normalisation is fitted without its held-out stocks (faster; see the module doc).
    run_fn: what a Ray task runs for one run, called as run_fn(config dict, RunSpec, held-out
            stocks, model_builder) -> scores (a seam for tests; the default trains for real)."""
    started = time.perf_counter()
    models = resolve_models(models)
    ms = list(dict.fromkeys(int(m) for m in ms))
    if not ms:
        raise ConfigError("--m: give at least one number of held-out stocks")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected an integer >= 1 (the runs use seeds 0 .. seeds-1)")
    if retries < 0:
        raise ConfigError(f"--retries {retries}: expected an integer >= 0")
    if not cfg.data.dataset_dir:
        raise ConfigError("data.dataset_dir is empty: set it in the config file or pass data.dataset_dir=DIR")
    dataset_dir = Path(cfg.data.dataset_dir).expanduser().resolve()
    base_hash = manifest_hash(dataset_dir)
    if cfg.data.exclude_instruments:
        raise ConfigError("data.exclude_instruments is set in the config; the robustness job chooses the "
                          "held-out stocks itself, leave it empty")

    paths = RobustnessPaths(Path(out_dir).expanduser().resolve() / ROBUSTNESS_DIR)
    pool = scorable_instruments(dataset_dir, cfg.data.test_split)
    held_out: dict[tuple[int, int], list[str]] = {}
    for m in ms:
        for seed in range(seeds):
            held_out[m, seed] = draw_held_out(pool, m, seed)
            write_text_atomic(paths.held_out_file(m, seed), "\n".join(held_out[m, seed]) + "\n")

    if reuse_normalisation:
        datasets = {key: None for key in held_out}
        data_hashes = {key: base_hash for key in held_out}
        prepares = {"normalisation": "shared: fitted on data.dataset_dir, held-out stocks included "
                    "(--reuse-normalisation)", "wall_s": 0.0}
    else:
        datasets, prepares = prepare_held_out_datasets(dataset_dir, paths, held_out, log)
        data_hashes = {key: manifest_hash(path) for key, path in datasets.items()}

    specs = [RunSpec(model, m, seed) for model in models for m in ms for seed in range(seeds)]
    configs = {spec: run_config(cfg, spec, held_out[spec.m, spec.seed], paths.runs, datasets[spec.m, spec.seed])
               for spec in specs}
    records: dict[RunSpec, dict] = {}
    todo: list[RunSpec] = []
    for spec in specs:
        previous = _completed_record(paths.result_file(spec), configs[spec], data_hashes[spec.m, spec.seed])
        if previous is not None:
            records[spec] = previous
        else:
            todo.append(spec)
    skipped = len(specs) - len(todo)
    log(f"robustness: {len(specs)} runs ({len(models)} models x m={ms} x {seeds} seeds), "
        f"{skipped} already complete, {len(todo)} to run")

    def write_outputs() -> dict:
        return write_results(paths, specs, records, models)

    parallel = 0
    if todo:
        ensure_ray(cfg)
        parallel = _parallel_slots(cfg, max_parallel, len(todo), log)
        _run_all(todo, configs, held_out, paths, data_hashes, records, parallel, retries, model_builder,
                 run_fn, log, write_outputs)
    files = write_outputs()
    wall = time.perf_counter() - started
    failed = sum(1 for spec in specs if records.get(spec, {}).get("status") != "ok")
    job = {"wall_s": wall, "max_parallel": parallel, "runs": len(specs), "ran": len(todo), "skipped": skipped,
           "failed": failed, "retries": retries, "models": models, "m": ms, "seeds": seeds,
           "dataset_dir": str(dataset_dir), "manifest_hash": base_hash, "prepare": prepares}
    write_text_atomic(paths.root / "job.json", json.dumps(job, indent=1) + "\n")
    log(f"robustness: done in {wall:.1f} s ({len(todo)} runs, max {parallel} in parallel); "
        f"{failed} failed; {files['table2_md']}")
    return JobSummary(results=read_results(paths.results_csv), ran=len(todo), skipped=skipped, failed=failed,
                      wall_s=wall, max_parallel=parallel, paths=paths, files=files)


def _run_all(todo, configs, held_out, paths, data_hashes, records, parallel, retries, model_builder, run_fn, log,
             write_outputs) -> None:
    """Keep up to `parallel` runs in flight; resubmit failures up to `retries` times."""
    remote = ray.remote(num_cpus=0, max_retries=0)(run_fn)
    queue = list(todo)
    attempts: dict[RunSpec, int] = {}
    in_flight: dict[ray.ObjectRef, tuple[RunSpec, float]] = {}

    def submit(spec: RunSpec) -> None:
        attempts[spec] = attempts.get(spec, 0) + 1
        held = held_out[spec.m, spec.seed]
        ref = remote.options(name=f"robustness:{spec.name}").remote(
            config_to_dict(configs[spec]), spec, held, model_builder)
        in_flight[ref] = (spec, time.perf_counter())

    try:
        while queue or in_flight:
            while queue and len(in_flight) < parallel:
                submit(queue.pop(0))
            done, _ = ray.wait(list(in_flight), num_returns=1)
            spec, submitted = in_flight.pop(done[0])
            try:
                scores = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - any failure of a run is recorded, none is fatal
                error = _error_text(exc)
                if attempts[spec] <= retries:
                    log(f"robustness: {spec.name} failed (attempt {attempts[spec]}), retrying: {error}")
                    submit(spec)
                    continue
                log(f"robustness: {spec.name} FAILED after {attempts[spec]} attempt(s): {error}")
                records[spec] = _record(spec, configs[spec], held_out, paths, data_hashes[spec.m, spec.seed],
                                        status="failed",
                                        attempts=attempts[spec], error=error,
                                        wall_s=time.perf_counter() - submitted)
            else:
                records[spec] = _record(spec, configs[spec], held_out, paths, data_hashes[spec.m, spec.seed],
                                        status="ok",
                                        attempts=attempts[spec], **scores)
                log(f"robustness: {spec.name} rank_ic={scores['rank_ic']:.4f} rank_icir={scores['rank_icir']:.4f} "
                    f"({scores['wall_s']:.1f} s)")
            write_text_atomic(paths.result_file(spec), json.dumps(_json_safe(records[spec]), indent=1) + "\n")
            write_outputs()
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)


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
        costs[folder.name] = {"path": str(folder.relative_to(paths.root)), "reused": result.reused,
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


def _parallel_slots(cfg: ExperimentConfig, requested: int, n_runs: int, log) -> int:
    """How many runs fit at once: their workers' CPUs, with one CPU left to Ray Data (shared by
    all runs), and their GPUs. Asking for more than fits is capped, with a note."""
    resources = ray.cluster_resources()
    per_run = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = int((resources.get("CPU", 0.0) - 1.0 + 1e-9) // per_run)
    if cfg.ray.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) // cfg.ray.num_workers))
    fits = max(fits, 1)  # one run that does not fit is refused by train() with a clear message
    if requested < 0:
        raise ConfigError(f"--max-parallel {requested}: expected an integer >= 0 (0 = as many as fit)")
    if requested > fits:
        log(f"robustness: --max-parallel {requested} capped to {fits}: each run takes "
            f"{cfg.ray.num_workers} x {cfg.ray.cpus_per_worker:g} CPUs and the cluster has "
            f"{resources.get('CPU', 0.0):g} with 1 kept for Ray Data")
    return max(1, min(requested or fits, fits, n_runs))


def _completed_record(path: Path, cfg: ExperimentConfig, data_hash: str) -> dict | None:
    """A finished run's record, or None when it still has to run. A finished run made with other
    settings is an error: mixing it into the table would be silent nonsense."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        return None
    differences = _config_differences(record.get("config", {}), _fingerprint(cfg))
    if record.get("manifest_hash") != data_hash:
        differences.insert(0, f"data set manifest hash {record.get('manifest_hash')} -> {data_hash}")
    if differences:
        raise ConfigError(f"{path}: this run finished with other settings ({'; '.join(differences[:4])}); "
                          "use another --out for a new job, or delete that run folder to redo it")
    return record


def _record(spec, cfg, held_out, paths, data_hash, *, status, attempts, **values) -> dict:
    record = {
        "model": MODELS[spec.model].label,
        "model_key": spec.model,
        "m": spec.m,
        "seed": spec.seed,
        "status": status,
        "attempts": attempts,
        "run_dir": str(paths.run_dir(spec).relative_to(paths.root)),
        "held_out_file": str(paths.held_out_file(spec.m, spec.seed).relative_to(paths.root)),
        "held_out": held_out[spec.m, spec.seed],
        "manifest_hash": data_hash,
        "config": _fingerprint(cfg),
    }
    record.update(values)
    return record


def _fingerprint(cfg: ExperimentConfig) -> dict:
    """What decides a run's result: everything but where and how wide it ran."""
    data = config_to_dict(cfg)
    data.pop("ray")
    return data


def _config_differences(saved: dict, current: dict) -> list[str]:
    out = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        out += [f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
                if a.get(key) != b.get(key) and key != "exclude_instruments"]
        if a.get("exclude_instruments") != b.get("exclude_instruments"):
            out.append(f"{section}.exclude_instruments (the held-out stocks) changed")
    return out


def _error_text(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError carries the task's own exception
    cause = cause if isinstance(cause, BaseException) else exc
    if isinstance(cause, FvaeError):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    lines = [line for line in traceback.format_exception_only(type(cause), cause)[-1].splitlines() if line.strip()]
    return lines[-1] if lines else repr(cause)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def write_results(paths: RobustnessPaths, specs: Sequence[RunSpec], records: Mapping[RunSpec, dict],
                  models: Sequence[str]) -> dict:
    """results.csv (every run of the grid; unfinished ones as "pending") and Table 2 (md, csv)."""
    rows = []
    for spec in specs:
        record = records.get(spec) or {
            "model": MODELS[spec.model].label, "model_key": spec.model, "m": spec.m, "seed": spec.seed,
            "status": "pending", "attempts": 0, "run_dir": str(paths.run_dir(spec).relative_to(paths.root)),
            "held_out_file": str(paths.held_out_file(spec.m, spec.seed).relative_to(paths.root)),
        }
        rows.append({column: record.get(column) for column in RESULTS_COLUMNS})
    results = pd.DataFrame(rows, columns=RESULTS_COLUMNS)
    write_text_atomic(paths.results_csv, results.to_csv(index=False))
    text, table = table2(results)
    write_text_atomic(paths.root / "table2.md", text + "\n")
    write_text_atomic(paths.root / "table2.csv", table.to_csv(index=False))
    return {"results_csv": paths.results_csv, "table2_md": paths.root / "table2.md",
            "table2_csv": paths.root / "table2.csv"}


def read_results(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=True)


def table2(results: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The paper's Table 2: a row per model, Rank IC and Rank ICIR per m as mean (std) over the
    seeds that finished; a cell with failed or unfinished runs says how many."""
    ms = sorted(int(m) for m in results["m"].unique())
    header = ["Methods"] + [f"m={m} {name}" for m in ms for name in ("Rank IC", "Rank ICIR")]
    rows, numbers = [], []
    for model in dict.fromkeys(results["model"]):
        row = [str(model)]
        for m in ms:
            cell = results[(results["model"] == model) & (results["m"] == m)]
            ok = cell[cell["status"] == "ok"]
            n_failed = int((cell["status"] == "failed").sum())
            n_pending = int((~cell["status"].isin(["ok", "failed"])).sum())
            note = "".join([f" [{n_failed} of {len(cell)} failed]" if n_failed else "",
                            f" [{n_pending} of {len(cell)} pending]" if n_pending else ""])
            row += [fmt_mean_std(ok["rank_ic"]) + note, fmt_mean_std(ok["rank_icir"]) + note]
            ic_mean, ic_std, _ = mean_std(ok["rank_ic"])
            ir_mean, ir_std, _ = mean_std(ok["rank_icir"])
            numbers.append({"model": model, "m": m, "rank_ic_mean": ic_mean, "rank_ic_std": ic_std,
                            "rank_icir_mean": ir_mean, "rank_icir_std": ir_std, "runs_ok": len(ok),
                            "runs_failed": n_failed, "runs_pending": n_pending,
                            "seeds_ok": " ".join(str(int(s)) for s in sorted(ok["seed"]))})
        rows.append(row)
    text = "\n".join([
        markdown_table(header, rows), "",
        "Rank IC / Rank ICIR of the test-span predictions on the m stocks held out of training and validation; "
        "mean (std, ddof=1) over seeds. [k of n failed] marks runs that failed after their retries "
        "(see results.csv).",
    ])
    return text, pd.DataFrame(numbers)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

