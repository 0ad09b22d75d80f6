"""Hyperparameter campaigns: Ray Tune trials that each run one `fvae-dist train` run.

    load_campaign(path, overrides) -> CampaignSpec    the YAML below, checked without starting Ray
    run_campaign(spec) -> CampaignOutcome              start, or continue, the experiment

A campaign YAML (tune_configs/tune_*.yaml) has three sections:

    base:   {config: demo.yaml, overrides: {train.epochs: 3, ...}}   the train preset every trial starts from
                                                                      (path relative to the campaign file)
    space:  {model.num_factors: {type: int, low: 2, high: 8}, ...}   what Optuna varies (int / float / choice,
                                                                      `log: true` for a log scale)
    tune:   {metric, mode, num_samples, seed, max_concurrent_trials, asha: {...}, resources: {...}, ...}

Each trial is a Tune function trainable that builds the same TorchTrainer as `fvae-dist train`
(train.trainer.build_trainer) with the trial's hyperparameters and calls fit(): the Ray Train V2
pattern, one way to train. A Train callback (TrialReportCallback) forwards every per-epoch
report to Tune, where OptunaSearch (seeded TPE) proposes the next trials and ASHA judges each
epoch's validation Rank IC; a trial it stops ends its Train run cleanly (GracefulASHA).
Before any trial starts, the campaign is checked: hyperparameter names and ranges, the metric,
the data set, and whether a trial (and max_concurrent_trials of them) fits the Ray cluster.

Experiment folder <tune.storage_path>/<tune.name>/:
    campaign.yaml            the resolved campaign (a rerun with another one is refused)
    trial_<id>/              Tune's trial folder AND that trial's Train run folder: config.yaml,
                             metrics.json, tensorboard/, checkpoint_epochNNNN/ (train.trainer), plus
                             Tune's result.json, progress.csv and events (searched hyperparameters
                             against the last reported metrics: TensorBoard's HParams tab), and
                             tune_decision.json (ASHA's verdict on the latest epoch)
    results.csv, results.md  one row per trial, best validation Rank IC first (rewritten as trials end)
    best_config.yaml         the best trial's config; `fvae-dist train --config` accepts it as is
    best_checkpoint.txt      path of the best trial's best-epoch checkpoint
    summary.json             the same facts for scripts
`tensorboard --logdir <experiment folder>` shows every trial's curves and the HParams view.

Resuming: running the same command again restores the experiment (Tuner.restore). Finished trials
are kept as they are; a trial that was running is restarted and its Train run continues from its
latest checkpoint, because its run folder (trial_<id>) is the same.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray
import ray.train
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from fvae_dist.config import (
    ExperimentConfig,
    all_keys,
    config_from_dict,
    config_to_dict,
    load_config,
    nearest_name_hint,
    parse_override,
    with_overrides,
    write_text_atomic,
)
from fvae_dist.errors import ConfigError

CAMPAIGN_FILE = "campaign.yaml"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"
SUMMARY_FILE = "summary.json"
TRIAL_DIR_PREFIX = "trial_"

# Tune's time axis for ASHA: epochs completed by the trial's Train run (added to every report).
EPOCHS_DONE = "epochs_done"
# The scheduler's verdict on a trial's latest epoch, written by the driver into the trial's folder
# and read by the trial's Train controller (see GracefulASHA).
DECISION_FILE = "tune_decision.json"
DECISION_WAIT_S = 60.0
# Reported for an epoch whose metric is undefined (e.g. NaN Rank IC of a diverged model).
UNDEFINED_WORST = {"max": -1.0e9, "min": 1.0e9}
PARAM_TYPES = ("int", "float", "choice")
SECTIONS = ("base", "space", "tune")
# Keys a campaign may not search over: the run folder and workers are the campaign's to set, the
# epoch budget is ASHA's max_t, and the data set is what every trial must share to be comparable.
FIXED_KEYS = {"train.epochs": "it is ASHA's budget; set it in base.overrides",
              "data.dataset_dir": "every trial must train on the same data set"}
# Settings that may differ when a campaign is resumed: they say where Ray is, not what is trained.
RESUME_MAY_CHANGE = ("base.ray.address", "base.ray.num_cpus")
# Ray Data needs whole CPUs that no training worker holds, or the input pipeline never runs.
RAY_DATA_CPUS = 1.0


# ----------------------------------------------------------------------------------------------
# The campaign spec
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: a dotted config key and its range."""

    key: str
    type: str  # "int", "float" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple = ()

    def extremes(self) -> list:
        """Values at the edges of the range: each must give a valid config."""
        return list(self.values) if self.type == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice {list(self.values)}"
        scale = " log" if self.log else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.type} [{self.low:g}, {self.high:g}]{scale}{step}"


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds while it runs."""

    num_workers: int = 1
    """Ray Train workers (DDP processes) per trial; becomes ray.num_workers of the trial's run."""

    cpus_per_worker: float = 0.5
    """CPUs per Train worker; fractions leave room for Ray Data on small machines."""

    use_gpu: bool = False
    """One GPU per Train worker (NCCL); the trial then needs num_workers GPUs."""

    driver_cpus: float = 0.05
    """CPUs of the Tune trial actor itself. It only launches and watches the Train run (the
    workers do the work), so a sliver is enough; it must be > 0 for Ray to place it."""


@dataclass(frozen=True)
class AshaSettings:
    """Asynchronous successive halving over epochs (time axis: epochs completed)."""

    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""

    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of the trials go on."""


@dataclass(frozen=True)
class TuneSettings:
    name: str
    """Experiment folder name under storage_path; rerunning with the same name resumes."""

    storage_path: str = "runs"
    """Parent of the experiment folder (relative to the working directory)."""

    metric: str = "best_valid_rank_ic"
    """A per-epoch metric of the training loop. best_valid_rank_ic is the validation Rank IC of the
    trial's best epoch so far: the score of the checkpoint it keeps. valid_rank_ic is the epoch's own."""

    mode: str = "max"
    num_samples: int = 8
    """Trials in the campaign."""

    seed: int = 0
    """Seeds Optuna's TPE sampler, so a campaign proposes the same trials when rerun from scratch."""

    tpe_startup_trials: int = 10
    """Trials TPE samples at random before it starts modelling the results."""

    max_concurrent_trials: int = 0
    """Trials running at once; 0 = as many as the cluster fits (CPUs, leaving Ray Data 1; GPUs)."""

    max_failures: int = 0
    """Times Tune restarts a trial whose driver failed (the Train run resumes from its checkpoint)."""

    asha: AshaSettings = field(default_factory=AshaSettings)
    resources: TrialResources = field(default_factory=TrialResources)


@dataclass(frozen=True)
class CampaignSpec:
    source: str
    """The campaign file (for messages)."""

    base: ExperimentConfig
    """The train config every trial starts from, with resources and absolute paths applied."""

    space: tuple[ParamSpec, ...]
    tune: TuneSettings

    @property
    def experiment_dir(self) -> Path:
        return (Path(self.tune.storage_path).expanduser() / self.tune.name).resolve()

    def to_dict(self) -> dict:
        """Plain data, as written to campaign.yaml."""
        return {
            "base": config_to_dict(self.base),
            "space": {p.key: _param_to_dict(p) for p in self.space},
            "tune": dataclasses.asdict(self.tune),
        }


def load_campaign(path: str | Path, overrides: Sequence[str] = ()) -> CampaignSpec:
    """Read a campaign YAML and apply `key=value` overrides: `tune.*` keys set tune settings
    (`tune.resources.num_workers=2`), any other key (`data.dataset_dir=...`) is a base override."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: campaign file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {list(SECTIONS)}")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("tune."):
            _set_nested(data.setdefault("tune", {}), key.split(".")[1:], value, str(path))
        else:
            base = data.setdefault("base", {})
            base["overrides"] = _override_mapping(base.get("overrides"), f"{path}: base.overrides")
            base["overrides"][key] = value
    return campaign_from_dict(data, source=str(path), base_dir=path.parent, default_name=path.stem)


def campaign_from_dict(data: Mapping, *, source: str, base_dir: str | Path = ".", default_name: str = "tune") -> CampaignSpec:
    """Check every part of a campaign before anything runs; ConfigError names the setting."""
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}{nearest_name_hint(unknown[0], SECTIONS)}")
    tune = _tune_settings(data.get("tune") or {}, source, default_name)
    base = _base_config(data.get("base") or {}, source, Path(base_dir), tune.resources)
    space = _search_space(data.get("space"), source, base)
    if tune.asha.grace_period > base.train.epochs:
        raise ConfigError(f"{source}: tune.asha.grace_period={tune.asha.grace_period} is more than "
                          f"train.epochs={base.train.epochs}; no trial could be stopped early")
    known = reported_metrics()
    if tune.metric not in known:
        raise ConfigError(f"{source}: tune.metric={tune.metric!r} is never reported by the training loop"
                          f"{nearest_name_hint(tune.metric, known)}")
    return CampaignSpec(source=source, base=base, space=space, tune=tune)


def reported_metrics() -> list[str]:
    """The metrics every epoch reports (the training loop's own list), plus Tune's time axis."""
    from fvae_dist.train.loop import TrainState, epoch_metrics

    anything = collections.defaultdict(float)
    return sorted([*epoch_metrics(0, 0.0, anything, anything, 0.0, TrainState()), EPOCHS_DONE])


def _tune_settings(raw: Any, source: str, default_name: str) -> TuneSettings:
    raw = _mapping(raw, f"{source}: tune")
    raw = dict(raw)
    raw.setdefault("name", default_name)
    asha = _build(AshaSettings, raw.pop("asha", None) or {}, "tune.asha", source)
    resources = _build(TrialResources, raw.pop("resources", None) or {}, "tune.resources", source)
    tune = _build(TuneSettings, {**raw, "asha": asha, "resources": resources}, "tune", source)
    checks = [
        (bool(tune.name) and "/" not in tune.name, "tune.name", "a folder name without '/'", tune.name),
        (bool(tune.storage_path), "tune.storage_path", "a directory", tune.storage_path),
        (tune.mode in ("max", "min"), "tune.mode", '"max" or "min"', tune.mode),
        (tune.num_samples >= 1, "tune.num_samples", "an integer >= 1", tune.num_samples),
        (tune.tpe_startup_trials >= 1, "tune.tpe_startup_trials", "an integer >= 1", tune.tpe_startup_trials),
        (tune.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "an integer >= 0 (0 = as many as fit)",
         tune.max_concurrent_trials),
        (tune.max_failures >= -1, "tune.max_failures", "an integer >= -1 (-1 = unlimited)", tune.max_failures),
        (asha.grace_period >= 1, "tune.asha.grace_period", "an integer >= 1 (epochs)", asha.grace_period),
        (asha.reduction_factor > 1, "tune.asha.reduction_factor", "a number > 1", asha.reduction_factor),
        (resources.num_workers >= 1, "tune.resources.num_workers", "an integer >= 1", resources.num_workers),
        (resources.cpus_per_worker > 0, "tune.resources.cpus_per_worker", "a number > 0", resources.cpus_per_worker),
        (resources.driver_cpus > 0, "tune.resources.driver_cpus", "a number > 0 (e.g. 0.05)", resources.driver_cpus),
    ]
    for ok, key, expected, got in checks:
        if not ok:
            raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")
    return tune


def _base_config(raw: Any, source: str, base_dir: Path, resources: TrialResources) -> ExperimentConfig:
    raw = _mapping(raw, f"{source}: base")
    unknown = [k for k in raw if k not in ("config", "overrides")]
    if unknown:
        raise ConfigError(f"{source}: unknown key base.{unknown[0]}{nearest_name_hint(unknown[0], ['config', 'overrides'])}")
    preset = raw.get("config")
    if preset:
        preset = Path(preset).expanduser()
        preset = preset if preset.is_absolute() else base_dir / preset
    overrides = _override_mapping(raw.get("overrides"), f"{source}: base.overrides")
    try:
        cfg = load_config(preset, [])
        cfg = with_overrides(cfg, overrides)
        cfg = with_overrides(cfg, {
            "ray.num_workers": resources.num_workers,
            "ray.cpus_per_worker": resources.cpus_per_worker,
            "ray.use_gpu": resources.use_gpu,
        })
    except ConfigError as exc:
        raise ConfigError(f"{source}: base: {exc}") from None
    if not cfg.data.dataset_dir:
        raise ConfigError(f"{source}: base: data.dataset_dir is empty; set it in base.overrides or pass "
                          "data.dataset_dir=DIR")
    # Trial actors run in their own working directories: every path they get must be absolute.
    return with_overrides(cfg, {
        "data.dataset_dir": str(Path(cfg.data.dataset_dir).expanduser().resolve()),
        "ray.storage_path": str(Path(cfg.ray.storage_path).expanduser().resolve()),
    })


def _search_space(raw: Any, source: str, base: ExperimentConfig) -> tuple[ParamSpec, ...]:
    raw = _mapping(raw, f"{source}: space")
    if not raw:
        raise ConfigError(f"{source}: space is empty; give at least one hyperparameter, e.g. "
                          "model.num_factors: {type: int, low: 2, high: 8}")
    keys = all_keys()
    space = []
    for key, spec in raw.items():
        where = f"{source}: space.{key}"
        if key not in keys:
            raise ConfigError(f"{where}: unknown hyperparameter{nearest_name_hint(key, keys)}")
        if key.startswith("ray.") or key in FIXED_KEYS:
            reason = FIXED_KEYS.get(key, "trial resources are set in tune.resources and run folders by the campaign")
            raise ConfigError(f"{where}: cannot be searched: {reason}")
        param = _param(key, _mapping(spec, where), where)
        for value in param.extremes():
            try:
                with_overrides(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {value!r} in the range gives an invalid config: {exc}") from None
        space.append(param)
    return tuple(space)


def _param(key: str, spec: Mapping, where: str) -> ParamSpec:
    kind = spec.get("type")
    if kind is None:
        kind = "choice" if "values" in spec else None
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: type must be one of {PARAM_TYPES}, got {kind!r}")
    allowed = ("type", "values") if kind == "choice" else ("type", "low", "high", "log", "step")
    unknown = [name for name in spec if name not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for type {kind}{nearest_name_hint(unknown[0], allowed)}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: values must be a non-empty list, got {values!r}")
        if any(isinstance(v, (dict, list)) for v in values) or len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: values must be distinct scalars, got {values!r}")
        return ParamSpec(key=key, type=kind, values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    log, step = spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if not _is_number(value) or (kind == "int" and float(value) != int(value)):
            raise ConfigError(f"{where}: {name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: empty range: low={low!r} must be < high={high!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got low={low!r}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}: step must be > 0 and cannot be combined with log, got step={step!r}")
    if kind == "int":
        return ParamSpec(key=key, type=kind, low=int(low), high=int(high), log=log, step=int(step) if step else None)
    return ParamSpec(key=key, type=kind, low=float(low), high=float(high), log=log, step=float(step) if step else None)


# ----------------------------------------------------------------------------------------------
# Cluster fit
# ----------------------------------------------------------------------------------------------

def concurrent_trials(spec: CampaignSpec, cluster: Mapping[str, float]) -> int:
    """How many trials run at once on a cluster with these resources (ray.cluster_resources()).

    Raises ConfigError when one trial does not fit, or when tune.max_concurrent_trials asks for
    more than fit: all running trials' workers together must leave Ray Data a whole CPU, or every
    input pipeline waits forever."""
    res = spec.tune.resources
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    per_trial = res.driver_cpus + res.num_workers * res.cpus_per_worker
    usable = cpus - RAY_DATA_CPUS
    eps = 1e-9
    if per_trial > usable + eps:
        raise ConfigError(
            f"{spec.source}: one trial needs {per_trial:g} CPUs (tune.resources: driver_cpus={res.driver_cpus:g} + "
            f"num_workers={res.num_workers} x cpus_per_worker={res.cpus_per_worker:g}), but the Ray cluster has "
            f"{cpus:g} CPUs and Ray Data needs {RAY_DATA_CPUS:g} free; lower tune.resources or use a larger cluster")
    if res.use_gpu and res.num_workers > gpus:
        raise ConfigError(
            f"{spec.source}: one trial needs {res.num_workers} GPUs (tune.resources.num_workers with use_gpu=true), "
            f"but the Ray cluster has {gpus:g}")
    fit = int((usable + eps) // per_trial)
    if res.use_gpu:
        fit = min(fit, int(gpus // res.num_workers))
    wanted = spec.tune.max_concurrent_trials
    if wanted > fit:
        raise ConfigError(
            f"{spec.source}: tune.max_concurrent_trials={wanted} trials need {wanted * per_trial:g} CPUs"
            + (f" and {wanted * res.num_workers} GPUs" if res.use_gpu else "")
            + f", but the Ray cluster has {cpus:g} CPUs (Ray Data keeps {RAY_DATA_CPUS:g})"
            + (f" and {gpus:g} GPUs" if res.use_gpu else "")
            + f"; at most {fit} fit: set tune.max_concurrent_trials={fit} (or 0 for as many as fit)")
    return min(wanted or fit, spec.tune.num_samples)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

@dataclass
class TrialRow:
    """One line of the results table."""

    trial_id: str
    status: str  # Tune's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    outcome: str  # completed / stopped early (patience) / stopped by ASHA / failed / unfinished
    score: float | None
    params: dict
    epochs: int
    wall_s: float | None
    final_valid_rank_ic: float | None
    final_test_rank_ic: float | None
    run_dir: str
    best_checkpoint: str | None
    error: str = ""


@dataclass
class CampaignOutcome:
    experiment_dir: Path
    rows: list[TrialRow]  # best first
    best: TrialRow | None
    resumed: bool
    concurrency: int
    num_samples: int

    @property
    def unfinished(self) -> int:
        """Trials still to run: started but not ended, or not even proposed yet (interrupted)."""
        ended = sum(r.status in ("TERMINATED", "ERROR") for r in self.rows)
        return self.num_samples - ended

    @property
    def failed(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == "ERROR"]


def run_campaign(spec: CampaignSpec, *, retry_errored: bool = False) -> CampaignOutcome:
    """Start the campaign, or continue it when its experiment folder holds one (same spec only)."""
    from fvae_dist.data.shards import load_manifest
    from fvae_dist.train.trainer import ensure_ray

    _check_data(spec, load_manifest(spec.base.data.dataset_dir))
    experiment_dir = spec.experiment_dir
    resumed = ray.tune.Tuner.can_restore(str(experiment_dir))
    _check_same_campaign(spec, experiment_dir, resuming=resumed)
    ensure_ray(spec.base)
    concurrency = concurrent_trials(spec, ray.cluster_resources())
    experiment_dir.mkdir(parents=True, exist_ok=True)
    if not (experiment_dir / CAMPAIGN_FILE).is_file():
        write_text_atomic(experiment_dir / CAMPAIGN_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))

    trainable = _trainable(spec)
    if resumed:
        tuner = ray.tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                       restart_errored=retry_errored)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space={},  # OptunaSearch owns the space (Optuna distributions, inclusive bounds)
            tune_config=ray.tune.TuneConfig(
                metric=spec.tune.metric,
                mode=spec.tune.mode,
                search_alg=_searcher(spec),
                scheduler=_scheduler(spec),
                num_samples=spec.tune.num_samples,
                max_concurrent_trials=concurrency,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=spec.tune.name,
                storage_path=str(experiment_dir.parent),
                failure_config=ray.tune.FailureConfig(max_failures=spec.tune.max_failures),
                callbacks=[ResultsTableCallback(spec)],
            ),
        )
    tuner.fit()
    rows = write_results(spec, ray.tune.ExperimentAnalysis(str(experiment_dir)).trials)
    best = next((r for r in rows if r.best_checkpoint and r.score is not None), None)
    return CampaignOutcome(experiment_dir=experiment_dir, rows=rows, best=best, resumed=resumed,
                           concurrency=concurrency, num_samples=spec.tune.num_samples)


def trial_dirname(trial) -> str:
    """Tune's folder for a trial, which is also the trial's Train run folder (ray.run_name)."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def trial_config(base: ExperimentConfig, params: Mapping[str, Any], experiment_dir: str | Path, trial_id: str) -> ExperimentConfig:
    """The config a trial trains: the base, the proposed hyperparameters, its own run folder."""
    return with_overrides(base, {
        **params,
        "ray.storage_path": str(experiment_dir),
        "ray.run_name": f"{TRIAL_DIR_PREFIX}{trial_id}",
    })


def run_trial(params: dict, *, base: dict, experiment_dir: str, metric: str, mode: str) -> None:
    """A Tune function trainable: one `fvae-dist train` run with this trial's hyperparameters.

    Runs in the trial's actor. The Train run's reports reach Tune through TrialReportCallback;
    there is nothing to return. A Train run that fails fails the trial."""
    from fvae_dist.train.trainer import build_trainer, prune_unregistered_checkpoints

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(config_from_dict(base, source="campaign base"), params, experiment_dir, trial_id)
    run_dir = Path(cfg.ray.storage_path) / cfg.ray.run_name
    trainer = build_trainer(cfg, callbacks=[TrialReportCallback(run_dir, metric, mode)])
    (run_dir / DECISION_FILE).unlink(missing_ok=True)  # a verdict from an earlier attempt is stale
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        if not _caused_by(exc, TrialStopped):
            raise
        return  # ASHA stopped the trial through TrialReportCallback; its run shut down cleanly
    prune_unregistered_checkpoints(result, cfg)


def _trainable(spec: CampaignSpec):
    res = spec.tune.resources
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=config_to_dict(spec.base), experiment_dir=str(spec.experiment_dir),
                                 metric=spec.tune.metric, mode=spec.tune.mode),
        {"CPU": res.driver_cpus},
    )


def _searcher(spec: CampaignSpec):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.tune.seed, n_startup_trials=spec.tune.tpe_startup_trials)
    return OptunaSearch(space=optuna_space(spec.space), metric=spec.tune.metric, mode=spec.tune.mode, sampler=sampler)


def optuna_space(space: Sequence[ParamSpec]) -> dict:
    """ParamSpec -> Optuna distributions (bounds inclusive, as written in the YAML)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for p in space:
        if p.type == "choice":
            out[p.key] = CategoricalDistribution(list(p.values))
        elif p.type == "int":
            out[p.key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def _scheduler(spec: CampaignSpec):
    return GracefulASHA(
        experiment_dir=spec.experiment_dir,
        time_attr=EPOCHS_DONE,
        max_t=spec.base.train.epochs,
        grace_period=spec.tune.asha.grace_period,
        reduction_factor=spec.tune.asha.reduction_factor,
    )


class TrialStopped(Exception):
    """Raised in a trial's Train controller to end its run because ASHA stopped the trial."""


class GracefulASHA(AsyncHyperBandScheduler):
    """ASHA whose stop decisions end the trial's Train run cleanly instead of killing its actor.

    Tune stops a trial by killing its actor; the Train controller it owns dies with it before it
    removes its workers' placement group. Ray Train's backstop for that (a detached cleaner) needs
    the dashboard's state API, which a local Ray started without the dashboard does not have: the
    CPUs stay reserved and, on a small machine, the next trial's Ray Data never gets one (seen as a
    hang on 2 CPUs). So every verdict goes to the trial instead (DECISION_FILE in its folder), Tune
    is told to continue, and TrialReportCallback ends the run through Ray Train's own error path,
    which shuts the worker group down and frees its resources. A trial at its last epoch is never
    stopped: it finishes and scores its best epoch on the validation and test splits."""

    def __init__(self, *, experiment_dir: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.experiment_dir = str(experiment_dir)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if EPOCHS_DONE in result:
            stop = decision == TrialScheduler.STOP and result[EPOCHS_DONE] < self._max_t
            write_decision(Path(self.experiment_dir) / f"{TRIAL_DIR_PREFIX}{trial.trial_id}",
                           int(result[EPOCHS_DONE]), "stop" if stop else "continue")
        return TrialScheduler.CONTINUE


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "controller_failure", None) or exc.__cause__ or exc.__context__
    return False


def write_decision(run_dir: Path, epochs_done: int, decision: str) -> None:
    write_text_atomic(Path(run_dir) / DECISION_FILE, json.dumps({"epochs_done": epochs_done, "decision": decision}))


def read_decision(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / DECISION_FILE).read_text())
    except (OSError, ValueError):
        return {}


class TrialReportCallback(TuneReportCallback):
    """Runs in the trial's Train controller: forwards each report to Tune with `epochs_done`
    (ASHA's time axis), then waits for the scheduler's verdict on that epoch and ends the run
    (TrialStopped, through Ray Train's error path) when it says stop. See GracefulASHA.

    Tune rejects a result without the campaign's metric. The loop's last report (final valid/test
    metrics) has no per-epoch metrics: it goes out merged onto the last epoch's, read from the run's
    metrics.json (written before that report, and there even when the run resumed after its last
    epoch). An epoch whose metric was undefined (NaN, dropped by the loop) reports the worst value."""

    def __init__(self, run_dir: Path, metric: str, mode: str):
        super().__init__()
        self.run_dir = str(run_dir)
        self.metric = metric
        self.worst = UNDEFINED_WORST[mode]

    def after_report(self, run_context, metrics, checkpoint):
        result = dict(metrics[0])
        if "epoch" not in result:
            result = {**_last_epoch_metrics(Path(self.run_dir)), **result}
            result.setdefault(self.metric, self.worst)
            super().after_report(run_context, [result], checkpoint)
            return
        epochs_done = result[EPOCHS_DONE] = int(result["epoch"]) + 1
        result.setdefault(self.metric, self.worst)
        super().after_report(run_context, [result], checkpoint)
        if self._verdict(epochs_done) == "stop":
            raise TrialStopped(f"ASHA stopped this trial after {epochs_done} epochs")

    def _verdict(self, epochs_done: int) -> str:
        """Wait (briefly) for the driver's scheduler to judge this epoch; no verdict = continue."""
        deadline = time.monotonic() + DECISION_WAIT_S
        while time.monotonic() < deadline:
            decision = read_decision(Path(self.run_dir))
            if decision.get("epochs_done", -1) >= epochs_done:
                return decision.get("decision", "continue")
            time.sleep(0.1)
        return "continue"


def _last_epoch_metrics(run_dir: Path) -> dict:
    metrics = _read_metrics(run_dir)
    history = metrics.get("history") or []
    if not history:
        return {}
    last = {k: v for k, v in history[-1].items() if v is not None}
    last[EPOCHS_DONE] = int(metrics.get("epochs_completed") or len(history))
    return last


class ResultsTableCallback(ray.tune.Callback):
    """Driver-side: rewrites the results table whenever a trial ends, so a long campaign can be
    inspected (and its best model used) before it finishes."""

    def __init__(self, spec: CampaignSpec):
        self.spec = spec

    # Tune calls these before it marks the trial as ended, hence the explicit status.
    def on_trial_complete(self, iteration, trials, trial, **info):
        write_results(self.spec, trials, ended={trial.trial_id: "TERMINATED"})

    def on_trial_error(self, iteration, trials, trial, **info):
        write_results(self.spec, trials, ended={trial.trial_id: "ERROR"})


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

def write_results(spec: CampaignSpec, trials: Sequence, ended: Mapping[str, str] | None = None) -> list[TrialRow]:
    """results.csv / results.md (best first), best_config.yaml, best_checkpoint.txt, summary.json.
    `ended` overrides the status of trials that Tune has not marked as ended yet."""
    experiment_dir = spec.experiment_dir
    ended = ended or {}
    rows = sort_rows([trial_row(spec, t, ended.get(t.trial_id)) for t in trials], spec.tune.mode)
    keys = [p.key for p in spec.space]
    write_text_atomic(experiment_dir / RESULTS_CSV, results_csv(rows, keys, spec.tune.metric))
    write_text_atomic(experiment_dir / RESULTS_MD, results_markdown(rows, keys, spec))
    best = next((r for r in rows if r.best_checkpoint and r.score is not None), None)
    summary = {
        "experiment_dir": str(experiment_dir),
        "metric": spec.tune.metric,
        "mode": spec.tune.mode,
        "num_samples": spec.tune.num_samples,
        "trials": {status: sum(r.status == status for r in rows) for status in sorted({r.status for r in rows})},
        "best": None,
        "tensorboard": f"tensorboard --logdir {experiment_dir}",
    }
    if best is not None:
        best_cfg = best_config(spec, best)
        header = (f"# Best trial {best.trial_id} of campaign {spec.tune.name}: {spec.tune.metric} = {best.score:.6g}\n"
                  f"# Its run folder: {best.run_dir}\n"
                  f"# Retrain it with: fvae-dist train --config {experiment_dir / BEST_CONFIG_FILE}\n")
        write_text_atomic(experiment_dir / BEST_CONFIG_FILE,
                          header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False))
        write_text_atomic(experiment_dir / BEST_CHECKPOINT_FILE, best.best_checkpoint + "\n")
        summary["best"] = {**dataclasses.asdict(best), "config": str(experiment_dir / BEST_CONFIG_FILE)}
    write_text_atomic(experiment_dir / SUMMARY_FILE, json.dumps(_json_safe(summary), indent=1))
    return rows


def trial_row(spec: CampaignSpec, trial, status: str | None = None) -> TrialRow:
    status = status or str(trial.status)
    run_dir = spec.experiment_dir / f"{TRIAL_DIR_PREFIX}{trial.trial_id}"
    metrics = _read_metrics(run_dir)
    last = dict(trial.last_result or {})
    score = _number(last.get(spec.tune.metric))
    if score is None and metrics.get("history"):
        score = _number(metrics["history"][-1].get(spec.tune.metric))
    final = metrics.get("final") or {}
    best_checkpoint = None
    if metrics.get("best_checkpoint") and (run_dir / metrics["best_checkpoint"]).is_dir():
        best_checkpoint = str(run_dir / metrics["best_checkpoint"])
    return TrialRow(
        trial_id=trial.trial_id,
        status=status,
        outcome=_outcome(status, metrics, spec.base.train.epochs),
        score=score,
        params={k: trial.config.get(k) for k in (p.key for p in spec.space)},
        epochs=int(metrics.get("epochs_completed") or 0),
        wall_s=_number(last.get("time_total_s")),
        final_valid_rank_ic=_number((final.get("valid") or {}).get("rank_ic")),
        final_test_rank_ic=_number((final.get("test") or {}).get("rank_ic")),
        run_dir=str(run_dir),
        best_checkpoint=best_checkpoint,
        error=_first_error_line(trial) if status == "ERROR" else "",
    )


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best score first; trials without a score last, in trial order."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.score is None, sign * r.score if r.score is not None else 0.0, r.trial_id))


def best_config(spec: CampaignSpec, best: TrialRow) -> ExperimentConfig:
    """The best trial's training config as a fresh run: its hyperparameters, the base's run folder
    parent and a new run name, so `fvae-dist train --config best_config.yaml` retrains it."""
    cfg = trial_config(spec.base, best.params, spec.experiment_dir, best.trial_id)
    return with_overrides(cfg, {"ray.storage_path": spec.base.ray.storage_path,
                                "ray.run_name": f"{spec.tune.name}-best"})


def results_csv(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "trial_id", "status", "outcome", metric, *keys, "epochs", "wall_s",
                     "final_valid_rank_ic", "final_test_rank_ic", "best_checkpoint", "error"])
    for i, r in enumerate(rows, 1):
        writer.writerow([i, r.trial_id, r.status, r.outcome, _csv(r.score), *(_csv(r.params.get(k)) for k in keys),
                         r.epochs, _csv(r.wall_s), _csv(r.final_valid_rank_ic), _csv(r.final_test_rank_ic),
                         r.best_checkpoint or "", r.error])
    return out.getvalue()


def results_markdown(rows: Sequence[TrialRow], keys: Sequence[str], spec: CampaignSpec) -> str:
    head = ["#", "trial", "outcome", spec.tune.metric, *keys, "epochs", "wall s", "final valid Rank IC",
            "final test Rank IC"]
    lines = [
        f"# Campaign {spec.tune.name}",
        "",
        f"{len(rows)} of {spec.tune.num_samples} trials, sorted by {spec.tune.metric} ({spec.tune.mode}). "
        f"Search space: " + "; ".join(f"{p.key} {p.describe()}" for p in spec.space) + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for i, r in enumerate(rows, 1):
        cells = [str(i), r.trial_id, r.outcome, _fmt(r.score), *(_fmt(r.params.get(k)) for k in keys), str(r.epochs),
                 _fmt(r.wall_s, 1), _fmt(r.final_valid_rank_ic), _fmt(r.final_test_rank_ic)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Checks and small helpers
# ----------------------------------------------------------------------------------------------

def _check_data(spec: CampaignSpec, manifest: dict) -> None:
    features = manifest.get("features") or []
    if features and spec.base.model.num_features not in (0, len(features)):  # 0: the data set's
        raise ConfigError(f"{spec.source}: model.num_features={spec.base.model.num_features}, but the data set "
                          f"{spec.base.data.dataset_dir} has {len(features)} features; set base.overrides "
                          f"model.num_features: {len(features)}")
    splits = manifest.get("splits") or {}
    for role in ("train_split", "valid_split"):
        name = getattr(spec.base.data, role)
        if splits and name not in splits:
            raise ConfigError(f"{spec.source}: data.{role}={name!r} is not a split of {spec.base.data.dataset_dir}; "
                              f"it has {sorted(splits)}")


def _check_same_campaign(spec: CampaignSpec, experiment_dir: Path, *, resuming: bool) -> None:
    """A resumed experiment keeps its searcher, scheduler and trials: refuse a changed campaign
    instead of silently mixing two."""
    path = experiment_dir / CAMPAIGN_FILE
    if not path.is_file():
        if resuming:
            raise ConfigError(f"{experiment_dir}: holds a Tune experiment that was not started by `fvae-dist tune` "
                              f"(no {CAMPAIGN_FILE}); use another tune.name")
        return
    saved = _flatten(yaml.safe_load(path.read_text()) or {})
    current = _flatten(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k) and k not in RESUME_MAY_CHANGE]
    if changed:
        raise ConfigError(f"{experiment_dir}: this experiment was started with another campaign ({'; '.join(changed[:5])}"
                          f"{'; ...' if len(changed) > 5 else ''}). Rerun with the same campaign to continue it, "
                          "or set another tune.name for a new one.")


def _outcome(status: str, metrics: dict, max_epochs: int) -> str:
    if status == "ERROR":
        return "failed"
    if status != "TERMINATED":
        return "unfinished"
    if metrics.get("final"):
        return "stopped early (patience)" if metrics.get("stopped_early") else "completed"
    return "stopped by ASHA" if int(metrics.get("epochs_completed") or 0) < max_epochs else "stopped"


def _first_error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the last line of a traceback says what went wrong
    return lines[-1][:300] if lines else "failed (no error file)"


def _read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _build(cls, values: Mapping, where: str, source: str):
    """A settings dataclass from YAML values, typed by its fields; unknown keys get a suggestion."""
    values = _mapping(values, f"{source}: {where}")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise ConfigError(f"{source}: unknown key {where}.{unknown[0]}{nearest_name_hint(unknown[0], hints)}")
    return cls(**{name: _coerce(value, hints[name], f"{where}.{name}", source) for name, value in values.items()})


def _coerce(value: Any, kind: type, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return value  # already built by the caller
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and _is_number(value) and float(value).is_integer():
        return int(value)
    if kind is float and _is_number(value):
        return float(value)
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))
    raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")


def _mapping(value: Any, where: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _override_mapping(value: Any, where: str) -> dict:
    """base.overrides as a mapping; a list of "key=value" strings (the train CLI's form) works too."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict(parse_override(v) for v in value)
    raise ConfigError(f"{where}: expected a mapping of dotted keys (train.lr: 1.0e-3) or a list of "
                      f"key=value strings, got {value!r}")


def _set_nested(target: dict, path: list[str], value: Any, source: str) -> None:
    if not path or not all(path):
        raise ConfigError(f"override tune.{'.'.join(path)}: expected tune.NAME or tune.resources.NAME")
    for name in path[:-1]:
        child = target.get(name)
        target[name] = dict(child) if isinstance(child, Mapping) else {}
        target = target[name]
    target[path[-1]] = value



def _param_to_dict(p: ParamSpec) -> dict:
    if p.type == "choice":
        return {"type": "choice", "values": list(p.values)}
    out = {"type": p.type, "low": p.low, "high": p.high, "log": p.log}
    if p.step:
        out["step"] = p.step
    return out


def _flatten(data: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _csv(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if (abs(value) < 1e-3 and value != 0) else f"{value:.{digits}f}"
    return str(value)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

