"""The one way this package runs many trainings: a Ray Tune experiment whose every trial builds
the same TorchTrainer as `fvae-dist train` (train.trainer.build_trainer) and calls fit().

    run_experiment(Experiment(...)) -> ExperimentRun     start the experiment, or continue it

`fvae-dist tune` (tune/campaign.py: Optuna proposes, ASHA stops) and grids of named trials
(tune/grid.py: the robustness job, `fvae-dist reproduce`) are thin layers over it:

    Tuner(trainable, param_space, TuneConfig(search_alg, scheduler, num_samples,
          max_concurrent_trials), RunConfig(storage_path, name, FailureConfig, callbacks)).fit()
    Tuner.restore(path, trainable, resume_unfinished=True, ...).fit()     when continuing

A trial's folder in the experiment folder is also its Train run's folder (ray.storage_path /
ray.run_name of the trial's config), so a trial that Tune starts again (FailureConfig, or a
restored experiment) continues from its Train run's latest checkpoint. The Train run reports to
Tune through Ray's TuneReportCallback (TrialReportCallback adds what the reports need here). A
trial that a scheduler stops is ended by Tune, which kills the trial's actor; Ray Train's
PlacementGroupCleaner then frees its workers' CPUs (train.trainer.ensure_ray starts local
clusters with the dashboard it needs). max_concurrent_trials is bounded by what the cluster fits
with a CPU left to Ray Data (train/cluster_fit.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from fvae_dist.config import ExperimentConfig
from fvae_dist.job_paths import require_durable
from fvae_dist.storage import UriPath, location, arrow_path
from fvae_dist.train.cluster_fit import RunShape, check_fits, cluster_nodes
from fvae_dist.tune.spec import EPOCHS_DONE

# Reported for an epoch whose metric is undefined (e.g. NaN Rank IC of a diverged model).
UNDEFINED_WORST = {"max": -1.0e9, "min": 1.0e9}


def experiment_dir(storage_path, name: str):
    """Where an experiment lives: <storage_path>/<name>, the one place a storage path becomes
    a folder (Tune's RunConfig and Tuner.restore get their paths from here): an absolute path,
    or a URI such as s3://bucket/tune/<name> (storage.py)."""
    return location(storage_path) / name


class TrialPlan:
    """What a trial trains, shipped to every trial actor (picklable). Subclasses say how Tune's
    params become the trial's train config and what runs after fit()."""

    metric: str | None = None
    mode: str = "max"
    model_builder: Callable | None = None
    """Optional callable(ModelConfig) -> nn.Module run in every Train worker (tests)."""

    def trial_config(self, params: Mapping[str, Any], trial_id: str) -> ExperimentConfig:
        raise NotImplementedError

    def before_fit(self, params: Mapping[str, Any], cfg: ExperimentConfig) -> bool:
        """Runs in the trial before anything starts; False: the trial has nothing left to do."""
        return True

    def after_fit(self, params: Mapping[str, Any], cfg: ExperimentConfig) -> None:
        """Runs in the trial after its Train run finished."""


def run_trial(params: dict, *, plan: TrialPlan) -> None:
    """A Tune function trainable: one `fvae-dist train` run with this trial's config.

    Runs in the trial's actor. The Train run's reports reach Tune through TrialReportCallback;
    there is nothing to return. A Train run that fails fails the trial (with the worker's own
    error when it raised one), which Tune then retries per FailureConfig."""
    from fvae_dist.train.trainer import build_trainer, fit, prune_unregistered_checkpoints, run_dir_of

    cfg = plan.trial_config(params, ray.tune.get_context().get_trial_id())
    if not plan.before_fit(params, cfg):
        return
    callback = TrialReportCallback(run_dir_of(cfg), plan.metric, plan.mode, cfg.train.epochs)
    result = fit(build_trainer(cfg, callbacks=[callback], model_builder=plan.model_builder))
    prune_unregistered_checkpoints(result, cfg)
    plan.after_fit(params, cfg)


class TrialReportCallback(TuneReportCallback):
    """Ray's TuneReportCallback, which forwards every report of the trial's Train run to Tune,
    with three additions that this training loop's reports need:

    - `epochs_done` (ASHA's time axis) on every epoch's report but the last one's. A trial at
      its last epoch has done all its training: a stop there would save nothing and only cut
      its final evaluation (and ASHA stops every trial that reaches max_t).
    - The loop's last report (final valid/test metrics, no per-epoch ones) goes out merged onto
      the last epoch's metrics, read from the run's metrics.json (written before that report,
      and there even when the run resumed after its last epoch): Tune rejects a result without
      the experiment's metric.
    - An epoch whose metric was undefined (NaN, dropped by the loop) reports the worst value."""

    def __init__(self, run_dir, metric: str | None, mode: str, epochs: int):
        super().__init__()
        self.run_dir = str(run_dir)  # a path or a URI: pickled with the trainer
        self.metric = metric
        self.worst = UNDEFINED_WORST[mode]
        self.epochs = epochs

    def after_report(self, run_context, metrics, checkpoint):
        result = dict(metrics[0])
        if "epoch" in result:
            if int(result["epoch"]) + 1 < self.epochs:
                result[EPOCHS_DONE] = int(result["epoch"]) + 1
        else:
            result = {**_last_epoch_metrics(location(self.run_dir)), **result}
        if self.metric:
            result.setdefault(self.metric, self.worst)
        super().after_report(run_context, [result], checkpoint)


def _last_epoch_metrics(run_dir) -> dict:
    from fvae_dist.tune.results import read_metrics

    history = read_metrics(run_dir).get("history") or []
    return {k: v for k, v in history[-1].items() if v is not None} if history else {}


@dataclass
class Experiment:
    """A Tune experiment of training runs, as run_experiment starts or continues it."""

    name: str
    storage_path: str | Path
    plan: TrialPlan
    cluster: ExperimentConfig
    """Whose ray.* settings start or join the cluster (train.trainer.ensure_ray)."""

    trial_shape: RunShape
    """What the most demanding trial holds, its Tune actor included: bounds max_concurrent_trials."""

    concurrency: Callable[[int], int]
    """Given how many trials fit the cluster at once, how many to run at once (it may refuse)."""

    param_space: dict = field(default_factory=dict)
    num_samples: int = 1
    metric: str | None = None
    mode: str | None = None
    search_alg: Any = None
    scheduler: Any = None
    max_failures: int = 0
    callbacks: Sequence = ()
    trial_dirname: Callable | None = None
    restore: bool = True
    """Continue the experiment in the folder, when there is one (Tuner.restore)."""

    resume_errored: bool = False
    restart_errored: bool = False


@dataclass
class ExperimentRun:
    folder: "Path | UriPath"
    resumed: bool
    concurrency: int
    results: ray.tune.ResultGrid


def run_experiment(experiment: Experiment) -> ExperimentRun:
    """Start the experiment, or continue the one in its folder (finished trials are kept as they
    are, unfinished ones continue; errored ones per resume_errored / restart_errored)."""
    from fvae_dist.train.trainer import ensure_ray

    folder = experiment_dir(experiment.storage_path, experiment.name)
    require_durable("experiment folder", folder)  # inside a Ray job: not in its temporary copy
    path, filesystem = arrow_path(folder)
    resumed = experiment.restore and ray.tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    ensure_ray(experiment.cluster)
    concurrency = experiment.concurrency(check_fits(experiment.trial_shape, cluster_nodes()))
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=experiment.plan),
                                        {"CPU": experiment.trial_shape.driver_cpus})
    if resumed:
        # Tune restores the experiment's own TuneConfig and RunConfig (tuner.pkl); the trainable,
        # and with it the plan, is this call's
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, storage_filesystem=filesystem,
                                       resume_errored=experiment.resume_errored,
                                       restart_errored=experiment.restart_errored)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=experiment.param_space,
            tune_config=ray.tune.TuneConfig(
                metric=experiment.metric,
                mode=experiment.mode,
                search_alg=experiment.search_alg,
                scheduler=experiment.scheduler,
                num_samples=experiment.num_samples,
                max_concurrent_trials=concurrency,
                trial_dirname_creator=experiment.trial_dirname,
            ),
            run_config=ray.tune.RunConfig(
                name=folder.name,
                storage_path=arrow_path(folder.parent)[0],
                storage_filesystem=filesystem,
                failure_config=ray.tune.FailureConfig(max_failures=experiment.max_failures),
                callbacks=list(experiment.callbacks) or None,
            ),
        )
    return ExperimentRun(folder=folder, resumed=resumed, concurrency=concurrency, results=tuner.fit())
