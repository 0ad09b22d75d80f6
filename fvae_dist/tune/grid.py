"""Grids of named trials on the runner (tune/run.py): each trial is a train config of its own,
nothing is searched and nothing stopped early (Tune's FIFO scheduling).

    run_grid(name, storage_path, trials, *, max_concurrent=0, max_failures=0,
             after_trial=None, on_update=None) -> GridOutcome

`trials` maps trial names (folder names, e.g. "factorvae-seed0") to train configs. The grid is
one Tune experiment in <storage_path>/<name>/ whose param_space is a grid_search over the trial
names, with at most `max_concurrent` trials at once (0: as many as the cluster fits with a CPU
left to Ray Data; more than fit is capped) and each trial retried `max_failures` times (Tune's
FailureConfig) before it is recorded as failed. Trial T trains in <storage_path>/<name>/T/: the
runner sets its ray.storage_path and ray.run_name, the rest of its config is the caller's
(ray.address / ray.num_cpus of the first trial start or join the cluster). That folder is Tune's
folder of the trial and its Train run's folder, and holds trial.json, the runner's record:

    {"status": "running" | "ok" | "failed", "attempts": N, "config": {...}, "result": {...},
     "wall_s": ..., "error": "..."}

`after_trial(name, cfg)` runs inside the trial once its Train run has finished (the robustness
job predicts and scores its held-out stocks there); what it returns becomes the trial's
`result`, and an exception fails the trial as a failed Train run does; it goes to the trial
actors, so it must be picklable (as model_builder, an optional callable(ModelConfig) -> nn.Module
for tests). `on_update(outcome)` runs in the driver whenever a trial ends, and once at the end
(to rewrite tables as trials finish).

Running a grid again:
- finished trials ("ok") are kept as they are and never run again;
- a trial that was running continues from its Train run's latest checkpoint (its folder is the
  same), a failed one is attempted again with a fresh `max_failures`;
- with the same trial names, max_concurrent and max_failures, the Tune experiment in the folder
  is continued (Tuner.restore, as `fvae-dist tune` does). Tuner.restore cannot add trials to an
  experiment nor change its limits, so otherwise (a trial added or removed, other limits) a new
  Tune experiment in the same folder runs the trials that have not finished;
- a trial whose config differs from the one it was started with (anything but ray.*, or a data
  set with another manifest) is refused before anything runs, naming the trial and the
  settings: use another grid name, or delete that trial's folder to redo it.
Stopping a grid (Ctrl+C): Tune saves its state and returns; the outcome then says `interrupted`,
and a caller with more to run after the grid stops there.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import ray.tune

from fvae_dist.config import ExperimentConfig, config_from_dict, config_to_dict, json_safe, with_overrides, write_text_atomic
from fvae_dist.storage import location
from fvae_dist.errors import ConfigError
from fvae_dist.train.cluster_fit import RunShape
from fvae_dist.tune.run import Experiment, TrialPlan, experiment_dir, run_experiment

TRIAL_FILE = "trial.json"
GRID_FILE = "grid.json"
TRIAL_DRIVER_CPUS = 0.05  # the trial actor only launches and watches its Train run
_TRIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class GridTrial:
    name: str
    status: str  # "ok", "failed" or "pending" (not run, or interrupted)
    run_dir: Path
    attempts: int = 0
    error: str = ""
    result: dict = field(default_factory=dict)
    wall_s: float | None = None


@dataclass
class GridOutcome:
    experiment_dir: Path
    trials: dict[str, GridTrial]  # in the order given
    ran: list[str]  # the trials this call had to run (not finished before)
    resumed: bool  # the Tune experiment in the folder was continued (Tuner.restore)
    concurrency: int  # trials at most at once (0: nothing ran)

    @property
    def failed(self) -> list[str]:
        return [name for name, trial in self.trials.items() if trial.status == "failed"]

    @property
    def pending(self) -> list[str]:
        return [name for name, trial in self.trials.items() if trial.status == "pending"]

    @property
    def interrupted(self) -> bool:
        """A trial this call ran neither finished nor failed: Tune was stopped (Ctrl+C), and its
        fit() returns rather than raises then."""
        return any(self.trials[name].status == "pending" for name in self.ran)


def run_grid(
    name: str,
    storage_path: str | Path,
    trials: Mapping[str, ExperimentConfig],
    *,
    max_concurrent: int = 0,
    max_failures: int = 0,
    after_trial: Callable[[str, ExperimentConfig], dict | None] | None = None,
    on_update: Callable[[GridOutcome], None] | None = None,
    model_builder: Callable | None = None,
    log: Callable[[str], None] = print,
) -> GridOutcome:
    """Run the grid's unfinished trials (see the module doc); return every trial's outcome."""
    folder = experiment_dir(storage_path, name)
    if not trials:
        raise ConfigError(f"{folder}: a grid needs at least one trial")
    if max_concurrent < 0:
        raise ConfigError(f"{folder}: max_concurrent={max_concurrent}: expected an integer >= 0 (0 = as many as fit)")
    configs = {trial: _in_folder(cfg, folder, trial) for trial, cfg in trials.items()}
    fingerprints = {trial: fingerprint(cfg) for trial, cfg in configs.items()}
    for trial in configs:
        _check_unchanged(folder / trial, trial, fingerprints[trial])
    to_run = [trial for trial in configs if read_record(folder / trial).get("status") != "ok"]
    if not to_run:
        return _finish(folder, configs, [], False, 0, on_update)

    settings = {"trials": sorted(configs), "max_concurrent": max_concurrent, "max_failures": max_failures}
    restore = _read_json(folder / GRID_FILE) == settings
    write_text_atomic(folder / GRID_FILE, json.dumps(settings, indent=1) + "\n")
    _ACTIVE[str(folder)] = lambda: on_update(_outcome(folder, configs, to_run, restore, 0)) if on_update else None
    try:
        run = run_experiment(Experiment(
            name=folder.name,
            storage_path=folder.parent,
            plan=GridPlan(configs, fingerprints, after_trial, model_builder),
            cluster=configs[to_run[0]],
            trial_shape=_largest(configs[trial] for trial in to_run),
            concurrency=lambda fit: _concurrency(max_concurrent, fit, len(to_run), log),
            param_space={"trial": ray.tune.grid_search(to_run)},
            max_failures=max_failures,
            callbacks=[GridProgress(str(folder))],
            trial_dirname=_trial_folder,
            restore=restore,
            resume_errored=True,
        ))
    finally:
        _ACTIVE.pop(str(folder), None)
    for result in run.results:  # a failure Tune saw but no callback recorded (e.g. while restoring)
        if result.error is not None and "trial" in (result.config or {}):
            _mark_failed(folder / result.config["trial"], _error_text(result.error))
    return _finish(folder, configs, to_run, run.resumed, run.concurrency, on_update)


def fingerprint(cfg: ExperimentConfig) -> dict:
    """What decides a trial's result: its config but where and how wide it runs (ray.*), and
    the manifest of the data set it trains on."""
    from fvae_dist.data.shards import manifest_hash

    config = config_to_dict(cfg)
    config.pop("ray")
    return {"config": config, "manifest_hash": manifest_hash(cfg.data.dataset_dir)}


class GridPlan(TrialPlan):
    """A grid trial: the named config; trial.json says when it started, and when it is done."""

    def __init__(self, configs: Mapping[str, ExperimentConfig], fingerprints: Mapping[str, dict],
                 after_trial: Callable | None, model_builder: Callable | None = None):
        self.configs = {trial: config_to_dict(cfg) for trial, cfg in configs.items()}
        self.fingerprints = dict(fingerprints)
        self.after_trial = after_trial
        self.model_builder = model_builder
        self._started = 0.0

    def trial_config(self, params: Mapping[str, Any], trial_id: str) -> ExperimentConfig:
        return config_from_dict(self.configs[params["trial"]], source=f"grid trial {params['trial']}")

    def before_fit(self, params: Mapping[str, Any], cfg: ExperimentConfig) -> bool:
        trial = params["trial"]
        run_dir = cfg.run_dir.expanduser().resolve()
        record = read_record(run_dir)
        if record.get("status") == "ok" and record.get("config") == self.fingerprints[trial]:
            return False  # finished, though Tune had not recorded it (the driver stopped first)
        self._started = time.time()
        write_record(run_dir, {"name": trial, "status": "running", "attempts": int(record.get("attempts", 0)) + 1,
                               "config": self.fingerprints[trial]})
        return True

    def after_fit(self, params: Mapping[str, Any], cfg: ExperimentConfig) -> None:
        trial = params["trial"]
        result = (self.after_trial(trial, cfg) if self.after_trial is not None else None) or {}
        run_dir = cfg.run_dir.expanduser().resolve()
        write_record(run_dir, {**read_record(run_dir), "status": "ok", "result": result, "error": "",
                               "wall_s": time.time() - self._started})


class GridProgress(ray.tune.Callback):
    """Driver side: records a trial that failed for good and lets run_grid's caller rewrite its
    tables whenever a trial ends. Tune stores callbacks with the experiment (tuner.pkl) and a
    restored experiment gets those back, so this one holds only the folder and finds the
    current call's on_update by it."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended()

    def on_trial_error(self, iteration, trials, trial, **info):
        from fvae_dist.tune.results import trial_error

        _mark_failed(location(self.folder) / trial.config["trial"], trial_error(trial))
        self._ended()

    def _ended(self) -> None:
        update = _ACTIVE.get(self.folder)
        if update is not None:
            update()


# experiment folder -> what its GridProgress calls in this process (see GridProgress)
_ACTIVE: dict[str, Callable[[], None]] = {}


def read_record(run_dir: str | Path) -> dict:
    """A trial's trial.json ({} before its first start)."""
    return _read_json(location(run_dir) / TRIAL_FILE) or {}


def write_record(run_dir: str | Path, record: dict) -> None:
    write_text_atomic(location(run_dir) / TRIAL_FILE, json.dumps(json_safe(record), indent=1) + "\n")


def _mark_failed(run_dir: Path, error: str) -> None:
    record = read_record(run_dir)
    if record.get("status") != "ok":
        write_record(run_dir, {**record, "status": "failed", "error": error})


def _error_text(error: BaseException) -> str:
    from fvae_dist.errors import error_line

    return error_line(error)[:300]


def _trial_folder(trial) -> str:
    """Tune's folder of a grid trial: the trial's name (its Train run's folder too)."""
    return trial.config["trial"]


def _in_folder(cfg: ExperimentConfig, folder: Path, trial: str) -> ExperimentConfig:
    if not isinstance(trial, str) or not _TRIAL_NAME.fullmatch(trial):
        raise ConfigError(f"{folder}: trial name {trial!r}: expected a folder name of letters, digits, '.', '_' "
                          "and '-'")
    return with_overrides(cfg, {"ray.storage_path": str(folder), "ray.run_name": trial})


def _check_unchanged(run_dir: Path, trial: str, current: dict) -> None:
    saved = read_record(run_dir).get("config")
    if saved is None or saved == current:
        return
    changes = _differences(saved, current, defaults={"config": _default_config()})
    if not changes:  # only settings a newer fvae-dist added, at their defaults
        return
    raise ConfigError(f"{run_dir}: trial {trial} was started with other settings ({'; '.join(changes[:4])}"
                      f"{'; ...' if len(changes) > 4 else ''}); use another grid name, or delete that folder to "
                      "redo the trial")


def _default_config() -> dict:
    config = config_to_dict(ExperimentConfig())
    config.pop("ray")
    return config


_ABSENT = object()


def _differences(saved: Any, current: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    """Settings that differ; one the saved record lacks counts as its default (`defaults`), so a
    setting added by a newer version, left at its default, changes nothing."""
    if isinstance(saved, dict) and isinstance(current, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        return [change for key in sorted(set(saved) | set(current))
                for change in _differences(saved.get(key, defaults.get(key, _ABSENT)), current.get(key, _ABSENT),
                                           f"{prefix}{key}.", defaults.get(key))]
    if saved == current:
        return []
    key = prefix.rstrip(".").removeprefix("config.")
    old, new = repr(saved), repr(current)
    return [f"{key} changed" if len(old) + len(new) > 60 else f"{key}: {old} -> {new}"]


def _largest(configs) -> RunShape:
    shapes = [RunShape.of(cfg, driver_cpus=TRIAL_DRIVER_CPUS, unit="trial") for cfg in configs]
    return max(shapes, key=lambda shape: (shape.gpus, shape.cpus))


def _concurrency(requested: int, fit: int, trials: int, log: Callable[[str], None]) -> int:
    if requested > fit:
        log(f"grid: {requested} trials at once capped to {fit}, what the Ray cluster fits with 1 CPU left to Ray Data")
    return max(1, min(requested or fit, fit, trials))


def _finish(folder: Path, configs, ran, resumed, concurrency, on_update) -> GridOutcome:
    outcome = _outcome(folder, configs, ran, resumed, concurrency)
    if on_update is not None:
        on_update(outcome)
    return outcome


def _outcome(folder: Path, configs: Mapping[str, ExperimentConfig], ran, resumed: bool, concurrency: int) -> GridOutcome:
    trials = {}
    for trial in configs:
        record = read_record(folder / trial)
        status = record.get("status")
        trials[trial] = GridTrial(
            name=trial,
            status=status if status in ("ok", "failed") else "pending",
            run_dir=folder / trial,
            attempts=int(record.get("attempts", 0)),
            error=str(record.get("error") or ""),
            result=dict(record.get("result") or {}),
            wall_s=record.get("wall_s"),
        )
    return GridOutcome(experiment_dir=folder, trials=trials, ran=list(ran), resumed=resumed, concurrency=concurrency)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
