"""`fvae-dist tune`: a hyperparameter campaign on the runner (tune/run.py).

    run_campaign(spec) -> CampaignOutcome       start, or continue, the campaign's experiment

Optuna's TPE (seeded: a fresh campaign proposes the same trials) proposes each trial's
hyperparameters, Tune's ASHAScheduler stops weak trials on their validation metric per epoch
(time axis: epochs completed), and every trial is one `fvae-dist train` run in
<tune.storage_path>/<tune.name>/trial_<id>/. Before any trial starts the campaign is checked
against its data set and the cluster (whether a trial, and max_concurrent_trials of them, fit
with a CPU left to Ray Data).

Experiment folder <tune.storage_path>/<tune.name>/:
    campaign.yaml            the resolved campaign (a rerun with another one is refused)
    trial_<id>/              Tune's trial folder AND that trial's Train run folder: config.yaml,
                             metrics.json, tensorboard/, checkpoint_epochNNNN/ (train.trainer), plus
                             Tune's result.json, progress.csv and events (searched hyperparameters
                             against the last reported metrics: TensorBoard's HParams tab)
    results.csv, results.md, best_config.yaml, best_checkpoint.txt, summary.json (tune/results.py)
`tensorboard --logdir <experiment folder>` shows every trial's curves and the HParams view.

Resuming: running the same command again restores the experiment (Tuner.restore). Finished trials
are kept as they are; a trial that was running is restarted and its Train run continues from its
latest checkpoint, because its run folder (trial_<id>) is the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import ray.tune
import yaml

from fvae_dist.config import ExperimentConfig, config_from_dict, config_to_dict, write_text_atomic
from fvae_dist.errors import ConfigError
from fvae_dist.job_paths import require_durable
from fvae_dist.train.cluster_fit import RunShape, check_fits
from fvae_dist.tune.results import TRIAL_DIR_PREFIX, TrialRow, best_row, trial_config, write_results
from fvae_dist.tune.run import Experiment, TrialPlan, experiment_dir, run_experiment
from fvae_dist.tune.spec import EPOCHS_DONE, CampaignSpec, ParamSpec

CAMPAIGN_FILE = "campaign.yaml"
# Settings that may differ when a campaign is resumed: they say where Ray is, not what is trained.
RESUME_MAY_CHANGE = ("base.ray.address", "base.ray.num_cpus")


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


class CampaignPlan(TrialPlan):
    """A campaign trial: the base config with the proposed hyperparameters (dotted keys), in the
    trial's own folder of the experiment."""

    def __init__(self, base: ExperimentConfig, folder: Path, metric: str, mode: str):
        self.base = config_to_dict(base)
        self.folder = str(folder)
        self.metric, self.mode = metric, mode

    def trial_config(self, params: Mapping[str, Any], trial_id: str) -> ExperimentConfig:
        base = config_from_dict(self.base, source="campaign base")
        return trial_config(base, params, self.folder, trial_id)


def trial_shape(spec: CampaignSpec) -> RunShape:
    res = spec.tune.resources
    return RunShape(res.num_workers, res.cpus_per_worker, res.use_gpu, res.driver_cpus,
                    settings="tune.resources.", unit="trial")


def concurrent_trials(spec: CampaignSpec, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many trials run at once on a cluster with these nodes (train/cluster_fit.py).

    Raises ConfigError when one trial does not fit, or when tune.max_concurrent_trials asks for
    more than fit: all running trials' workers together must leave Ray Data a whole CPU, or every
    input pipeline waits forever."""
    try:
        fit = check_fits(trial_shape(spec), nodes)
    except ConfigError as exc:
        raise ConfigError(f"{spec.source}: {exc}") from None
    return _concurrency(spec, fit)


def _concurrency(spec: CampaignSpec, fit: int) -> int:
    wanted = spec.tune.max_concurrent_trials
    if wanted > fit:
        raise ConfigError(f"{spec.source}: tune.max_concurrent_trials={wanted}, but at most {fit} fit the Ray "
                          f"cluster with 1 CPU left to Ray Data: set tune.max_concurrent_trials={fit} "
                          "(or 0 for as many as fit)")
    return min(wanted or fit, spec.tune.num_samples)


def run_campaign(spec: CampaignSpec, *, retry_errored: bool = False) -> CampaignOutcome:
    """Start the campaign, or continue it when its experiment folder holds one (same spec only)."""
    from fvae_dist.data.shards import load_manifest

    require_durable("data.dataset_dir", spec.base.data.dataset_dir)  # inside a Ray job: not in its temporary copy
    _check_data(spec, load_manifest(spec.base.data.dataset_dir))
    folder = experiment_dir(spec.tune.storage_path, spec.tune.name)
    resuming = ray.tune.Tuner.can_restore(str(folder))
    _check_same_campaign(spec, folder, resuming=resuming)
    if not (folder / CAMPAIGN_FILE).is_file():
        write_text_atomic(folder / CAMPAIGN_FILE, yaml.safe_dump(spec.to_dict(), sort_keys=False))

    run = run_experiment(Experiment(
        name=folder.name,
        storage_path=folder.parent,
        plan=CampaignPlan(spec.base, folder, spec.tune.metric, spec.tune.mode),
        cluster=spec.base,
        trial_shape=trial_shape(spec),
        concurrency=lambda fit: _concurrency(spec, fit),
        param_space={},  # OptunaSearch owns the space (Optuna distributions, inclusive bounds)
        num_samples=spec.tune.num_samples,
        metric=spec.tune.metric,
        mode=spec.tune.mode,
        search_alg=_searcher(spec),
        scheduler=_scheduler(spec),
        max_failures=spec.tune.max_failures,
        callbacks=[ResultsTableCallback(spec, folder)],
        trial_dirname=trial_dirname,
        restart_errored=retry_errored,
    ))
    rows = write_results(spec, folder, ray.tune.ExperimentAnalysis(str(folder)).trials)
    return CampaignOutcome(experiment_dir=folder, rows=rows, best=best_row(rows), resumed=run.resumed,
                           concurrency=run.concurrency, num_samples=spec.tune.num_samples)


def trial_dirname(trial) -> str:
    """Tune's folder for a trial, which is also the trial's Train run folder (ray.run_name)."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


class ResultsTableCallback(ray.tune.Callback):
    """Driver-side: rewrites the results table whenever a trial ends, so a long campaign can be
    inspected (and its best model used) before it finishes."""

    def __init__(self, spec: CampaignSpec, folder: Path):
        self.spec = spec
        self.folder = folder

    # Tune calls these before it marks the trial as ended, hence the explicit status.
    def on_trial_complete(self, iteration, trials, trial, **info):
        write_results(self.spec, self.folder, trials, ended={trial.trial_id: "TERMINATED"})

    def on_trial_error(self, iteration, trials, trial, **info):
        write_results(self.spec, self.folder, trials, ended={trial.trial_id: "ERROR"})


def asha(time_attr: str, max_t: int, grace_period: int, reduction_factor: float):
    """Tune's own ASHAScheduler over epochs; its stop ends the trial (see run.py)."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)


def _scheduler(spec: CampaignSpec):
    return asha(EPOCHS_DONE, spec.base.train.epochs, spec.tune.asha.grace_period, spec.tune.asha.reduction_factor)


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


def _check_same_campaign(spec: CampaignSpec, folder: Path, *, resuming: bool) -> None:
    """A resumed experiment keeps its searcher, scheduler and trials: refuse a changed campaign
    instead of silently mixing two."""
    path = folder / CAMPAIGN_FILE
    if not path.is_file():
        if resuming:
            raise ConfigError(f"{folder}: holds a Tune experiment that was not started by `fvae-dist tune` "
                              f"(no {CAMPAIGN_FILE}); use another tune.name")
        return
    saved = _flatten(yaml.safe_load(path.read_text()) or {})
    current = _flatten(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k) and k not in RESUME_MAY_CHANGE]
    if changed:
        raise ConfigError(f"{folder}: this experiment was started with another campaign ({'; '.join(changed[:5])}"
                          f"{'; ...' if len(changed) > 5 else ''}). Rerun with the same campaign to continue it, "
                          "or set another tune.name for a new one.")


def _flatten(data: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
