"""A campaign YAML (tune_configs/tune_*.yaml) as checked dataclasses, without starting Ray.

    load_campaign(path, overrides) -> CampaignSpec
    campaign_from_dict(data, source=...) -> CampaignSpec

Three sections:

    base:   {config: demo.yaml, overrides: {train.epochs: 3, ...}}   the train preset every trial starts from
                                                                      (path relative to the campaign file)
    space:  {model.num_factors: {type: int, low: 2, high: 8}, ...}   what Optuna varies (int / float / choice,
                                                                      `log: true` for a log scale)
    tune:   {metric, mode, num_samples, seed, max_concurrent_trials, asha: {...}, resources: {...}, ...}

Values are read and typed with config.py's rules (its YAML reader and `key=value` overrides, its
coercion: `true`, `yes` and `1` are the same boolean in a train preset and in a campaign).
Every check names the file and the setting: hyperparameter names and ranges (both ends of every
range must give a valid train config), the metric (one the training loop reports), the ASHA
budget against train.epochs.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fvae_dist.storage import location
from fvae_dist.config import (
    ExperimentConfig,
    all_keys,
    build_settings,
    config_to_dict,
    load_config,
    parse_override,
    read_yaml_mapping,
    require,
    with_overrides,
)
from fvae_dist.errors import ConfigError, nearest_name_hint

SECTIONS = ("base", "space", "tune")
PARAM_TYPES = ("int", "float", "choice")
# Tune's time axis for ASHA: epochs completed by the trial's Train run (see run.TrialReportCallback).
EPOCHS_DONE = "epochs_done"
# Keys a campaign may not search over: the run folder and workers are the campaign's to set, the
# epoch budget is ASHA's max_t, and the data set is what every trial must share to be comparable.
FIXED_KEYS = {"train.epochs": "it is ASHA's budget; set it in base.overrides",
              "data.dataset_dir": "every trial must train on the same data set"}


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: a dotted config key and its range (bounds inclusive)."""

    key: str
    type: str  # "int", "float" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: tuple = ()

    def __post_init__(self) -> None:
        where = f"space.{self.key}"
        object.__setattr__(self, "values", tuple(self.values))
        require(self.type in PARAM_TYPES, f"{where}.type", f"one of {PARAM_TYPES}", self.type)
        if self.type == "choice":
            require(bool(self.values), f"{where}.values", "a non-empty list", list(self.values))
            require(not any(isinstance(v, (dict, list, tuple)) for v in self.values)
                    and len({repr(v) for v in self.values}) == len(self.values),
                    f"{where}.values", "distinct scalars", list(self.values))
            return
        for name in ("low", "high", "step"):
            value = getattr(self, name)
            if value is None and name == "step":
                continue
            number = "an integer" if self.type == "int" else "a number"
            require(value is not None and (self.type != "int" or float(value).is_integer()), f"{where}.{name}",
                    number, value)
        if not self.low < self.high:
            raise ConfigError(f"{where}: empty range: low={self.low!r} must be < high={self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"{where}: a log scale needs low > 0, got low={self.low!r}")
        require(self.step is None or (self.step > 0 and not self.log), f"{where}.step",
                "a number > 0, not combined with log", self.step)
        if self.type == "int":
            for name in ("low", "high", "step"):
                if getattr(self, name) is not None:
                    object.__setattr__(self, name, int(getattr(self, name)))

    def extremes(self) -> list:
        """Values at the edges of the range: each must give a valid config."""
        return list(self.values) if self.type == "choice" else [self.low, self.high]

    def describe(self) -> str:
        if self.type == "choice":
            return f"choice {list(self.values)}"
        scale = " log" if self.log else ""
        step = f" step {self.step:g}" if self.step else ""
        return f"{self.type} [{self.low:g}, {self.high:g}]{scale}{step}"

    def to_dict(self) -> dict:
        if self.type == "choice":
            return {"type": "choice", "values": list(self.values)}
        return {"type": self.type, "low": self.low, "high": self.high, "log": self.log,
                **({"step": self.step} if self.step else {})}


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

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "tune.resources.num_workers", "an integer >= 1", self.num_workers)
        require(self.cpus_per_worker > 0, "tune.resources.cpus_per_worker", "a number > 0", self.cpus_per_worker)
        require(self.driver_cpus > 0, "tune.resources.driver_cpus", "a number > 0 (e.g. 0.05)", self.driver_cpus)


@dataclass(frozen=True)
class AshaSettings:
    """Asynchronous successive halving over epochs (time axis: epochs completed)."""

    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""

    reduction_factor: float = 2.0
    """At each rung only the best 1/reduction_factor of the trials go on."""

    def __post_init__(self) -> None:
        require(self.grace_period >= 1, "tune.asha.grace_period", "an integer >= 1 (epochs)", self.grace_period)
        require(self.reduction_factor > 1, "tune.asha.reduction_factor", "a number > 1", self.reduction_factor)


@dataclass(frozen=True)
class TuneSettings:
    name: str
    """Experiment folder name under storage_path; rerunning with the same name resumes."""

    storage_path: str = "runs"
    """Parent of the experiment folder: a directory (relative to the working directory) or a URI
    such as s3://bucket/tune, where Tune's state and every trial's run folder then live."""

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

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "tune.name", "a folder name without '/'", self.name)
        require(bool(self.storage_path), "tune.storage_path", "a directory or a URI such as s3://bucket/tune",
                self.storage_path)
        location(self.storage_path)  # a malformed URI is refused here, naming it
        require(self.mode in ("max", "min"), "tune.mode", '"max" or "min"', self.mode)
        require(self.num_samples >= 1, "tune.num_samples", "an integer >= 1", self.num_samples)
        require(self.tpe_startup_trials >= 1, "tune.tpe_startup_trials", "an integer >= 1", self.tpe_startup_trials)
        require(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "an integer >= 0 (0 = as many as fit)",
                self.max_concurrent_trials)
        require(self.max_failures >= -1, "tune.max_failures", "an integer >= -1 (-1 = unlimited)", self.max_failures)


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
        from fvae_dist.tune.run import experiment_dir

        return experiment_dir(self.tune.storage_path, self.tune.name)

    def to_dict(self) -> dict:
        """Plain data, as written to campaign.yaml."""
        return {
            "base": config_to_dict(self.base),
            "space": {p.key: p.to_dict() for p in self.space},
            "tune": dataclasses.asdict(self.tune),
        }


def load_campaign(path: str | Path, overrides: Sequence[str] = ()) -> CampaignSpec:
    """Read a campaign YAML and apply `key=value` overrides: `tune.*` keys set tune settings
    (`tune.resources.num_workers=2`), any other key (`data.dataset_dir=...`) is a base override."""
    path = Path(path)
    data = read_yaml_mapping(path, what="campaign file", sections=SECTIONS)
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("tune."):
            _set_nested(data.setdefault("tune", {}), key.split(".")[1:])[key.split(".")[-1]] = value
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
    raw = dict(_mapping(raw, f"{source}: tune"))
    raw.setdefault("name", default_name)
    asha = build_settings(AshaSettings, _mapping(raw.pop("asha", None), f"{source}: tune.asha"),
                          where="tune.asha", source=source)
    resources = build_settings(TrialResources, _mapping(raw.pop("resources", None), f"{source}: tune.resources"),
                               where="tune.resources", source=source)
    return build_settings(TuneSettings, {**raw, "asha": asha, "resources": resources}, where="tune", source=source)


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
        "data.dataset_dir": str(location(cfg.data.dataset_dir)),
        "ray.storage_path": str(location(cfg.ray.storage_path)),
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
        param = _param(key, _mapping(spec, where), source)
        for value in param.extremes():
            try:
                with_overrides(base, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {value!r} in the range gives an invalid config: {exc}") from None
        space.append(param)
    return tuple(space)


def _param(key: str, spec: Mapping, source: str) -> ParamSpec:
    where = f"{source}: space.{key}"
    kind = spec.get("type", "choice" if "values" in spec else None)
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: type must be one of {PARAM_TYPES}, got {kind!r}")
    allowed = ("type", "values") if kind == "choice" else ("type", "low", "high", "log", "step")
    unknown = [name for name in spec if name not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for type {kind}{nearest_name_hint(unknown[0], allowed)}")
    if kind == "choice" and not isinstance(spec.get("values"), list):
        raise ConfigError(f"{where}: values must be a non-empty list, got {spec.get('values')!r}")
    return build_settings(ParamSpec, {**spec, "type": kind, "key": key}, where=f"space.{key}", source=source)


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


def _set_nested(target: dict, path: list[str]) -> dict:
    """The mapping that the last name of `path` lands in (tune.resources.num_workers: the
    resources mapping), created as needed."""
    if not path or not all(path):
        raise ConfigError(f"override tune.{'.'.join(path)}: expected tune.NAME or tune.resources.NAME")
    for name in path[:-1]:
        child = target.get(name)
        target[name] = dict(child) if isinstance(child, Mapping) else {}
        target = target[name]
    return target
