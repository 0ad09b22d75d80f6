"""Experiment settings: frozen dataclasses, loaded from a YAML preset plus `key=value` overrides.

A preset in `tune_configs/` maps 1:1 onto `ExperimentConfig`:

    data:  {dataset_dir: ..., batch_days: 1, ...}      -> DataConfig
    model: {name: factorvae, hidden_size: 64, ...}     -> ModelConfig (models/registry.py: FactorVAEConfig
                                                          plus model.name and the baselines' settings)
    train: {epochs: 40, lr: 3.0e-4, ...}               -> TrainConfig
    ray:   {num_workers: 2, cpus_per_worker: 0.5, ...} -> RayConfig

Overrides use dotted keys (`train.lr=1e-3`, `data.exclude_instruments=[SH600000,SZ000001]`) and
are typed by the dataclass field they land on. An unknown section or key raises ConfigError
naming it and the nearest valid key, so a typo never silently trains the default.
Relative paths (data.dataset_dir, ray.storage_path) are taken relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fvae_dist.errors import ConfigError, nearest_name_hint
from fvae_dist.storage import UriPath, is_uri, location
from fvae_dist.models.registry import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class DataConfig:
    """Which prepared data set a run reads and how days are batched."""

    dataset_dir: str = ""
    """Data set written by `fvae-dist prepare` (manifest.json + shards/): a directory, or a URI such
    as s3://bucket/data/cn_all that every node reads through pyarrow. Required."""

    batch_days: int = 1
    """D: trading days per optimisation step and worker, padded to the largest N with a mask.
    1 is the paper's setting (one cross-section per step); the effective batch across the
    data-parallel workers is batch_days * ray.num_workers days."""

    exclude_instruments: tuple[str, ...] = ()
    """Stocks removed from every split before training (the robustness experiment's hold-out).
    Also removed from validation, so early stopping never sees them."""

    train_split: str = "train"
    """Name of the split (in manifest.json) the model is fitted on."""

    valid_split: str = "valid"
    """Split used for the per-epoch validation loss, IC / Rank IC and early stopping."""

    test_split: str = "test"
    """Split evaluated once at the end with the best epoch's weights (metrics.json "final")."""

    prefetch_batches: int = 4
    """How far each worker reads ahead: the Ray Data blocks its iterator fetches (up to
    data.days_per_block days each) and the padded batches queued for the step."""

    days_per_block: int = 8
    """G: days travel through Ray Data in blocks of at most G consecutive trading days of one
    shard, with the day-level features their windows need; the workers cut the [N, T, C]
    windows (data/day_blocks.py). Every epoch shuffles the order of the training blocks and the
    order of the days inside each (data/stream.py). The trade-off: a block holds about
    (G + T - 1) / G times the day-level features of its days (3.4x at G=8, T=20), so a small G
    costs memory (object store) and a large one randomness, since the days that travel together
    are always the same G consecutive ones (in random order, at a random place in the epoch).
    1 gives a uniform permutation of all days every epoch, at T (20) times the memory; it also
    costs one request to Ray Data's split coordinator per day instead of per G days."""

    feeder: bool = True
    """Read and pad each worker's training days in a separate "feeder" process on the worker's
    node (data/feeder.py) instead of in threads of the worker. Ray Data's per-day Python then no
    longer competes with the training step for the worker's GIL, which slows the step beside it
    (docs/benchmarks.md). false: the threads, one process less per worker."""

    def __post_init__(self) -> None:
        require(self.batch_days >= 1, "data.batch_days", "an integer >= 1", self.batch_days)
        require(self.prefetch_batches >= 0, "data.prefetch_batches", "an integer >= 0", self.prefetch_batches)
        require(self.days_per_block >= 1, "data.days_per_block", "an integer >= 1", self.days_per_block)
        for name in ("train_split", "valid_split", "test_split"):
            require(bool(getattr(self, name)), f"data.{name}", "a split name", getattr(self, name))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW, clipping, schedule, early stopping, numerics."""

    epochs: int = 40
    """Maximum number of passes over the training days (early stopping may end sooner)."""

    lr: float = 3.0e-4
    """Peak AdamW learning rate."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    grad_clip: float = 3.0
    """Clip the global gradient L2 norm to this value before each step; 0 disables."""

    lr_schedule: str = "constant"
    """Per-epoch learning-rate schedule after warm-up: "constant", "cosine" (to lr_min_ratio * lr
    at the last epoch) or "step" (times lr_step_gamma every lr_step_epochs epochs)."""

    warmup_epochs: int = 0
    """Epochs of linear warm-up from lr / (warmup_epochs + 1) to lr before the schedule starts."""

    lr_min_ratio: float = 0.1
    """"cosine" only: the final learning rate as a fraction of lr. Not 0: the cosine reaches its
    end at the last epoch, which would then train with a learning rate of 0."""

    lr_step_epochs: int = 10
    """"step" only: epochs between decays."""

    lr_step_gamma: float = 0.5
    """"step" only: multiplicative decay."""

    early_stopping_patience: int = 10
    """Stop after this many epochs without a better validation Rank IC; 0 disables."""

    early_stopping_min_delta: float = 0.0
    """Smallest Rank IC gain that counts as better."""

    seed: int = 0
    """Seeds model initialisation (same on every worker), the factor sampling (per worker) and
    the per-epoch day shuffle."""

    precision: str = "fp32"
    """"fp32"; "bf16": autocast to bfloat16 (CPU or CUDA); "fp16": autocast to float16 with a
    dynamic GradScaler (CUDA only)."""

    deepspeed: bool = False
    """Train through a DeepSpeed engine (ZeRO stage `deepspeed_zero_stage`) instead of DDP."""

    deepspeed_zero_stage: int = 0
    """ZeRO stage for the DeepSpeed engine: 0 (plain data parallel), 1 or 2."""

    keep_checkpoints: int = 2
    """Checkpoints kept on disk: the best by validation Rank IC and the latest are always among
    them (Ray's CheckpointConfig num_to_keep)."""

    torch_threads: int = 0
    """Intra-op threads per worker; 0 = max(1, floor(ray.cpus_per_worker))."""

    cpu_kernels: str = "auto"
    """Optional CPU fast paths (fvae_dist/accel/): "auto" uses every one that applies to the
    run's device and precision, "off" none (the model and torch exactly as written), or a
    comma-separated subset of "gru", "allocator" and "compile". They never change the function trained,
    only how fast a CPU computes it; GPU runs ignore them. Gains: docs/benchmarks.md."""

    index_share: float = 0.0
    """Beyond the paper: the share of each training day's loss (eq. 17's NLL; a baseline's MSE)
    carried by that day's members of the index in train.index_membership, the rest by the other
    stocks. 0 (the default) is the paper's objective: every stock weighs the same. 0.5 makes the
    members (CSI300's ~300 of ~3,000 A-shares) weigh as much as all other stocks together, for a
    user who trades the index but wants the model fitted on the whole market. The encoder, the
    portfolios, the attention and validation are unchanged (train/loss_weights.py)."""

    index_membership: str = ""
    """CSV or Parquet of point-in-time index membership (instrument, start_date, end_date), read
    on the driver; required when train.index_share > 0. A relative path is taken relative to the
    working directory when the config is loaded."""

    audit_days: bool = False
    """Write <run>/audit/epoch-E-rank-R.json with the dates each worker trained on (a test and
    debugging aid: shows the workers' days are disjoint and their step counts equal)."""

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        require(_finite(self.lr) and self.lr > 0, "train.lr", "a number > 0", self.lr)
        require(_finite(self.weight_decay) and self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        require(_finite(self.grad_clip) and self.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 disables)", self.grad_clip)
        require(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"one of {LR_SCHEDULES}", self.lr_schedule)
        require(self.warmup_epochs >= 0, "train.warmup_epochs", "an integer >= 0", self.warmup_epochs)
        require(_finite(self.lr_min_ratio) and 0 <= self.lr_min_ratio <= 1, "train.lr_min_ratio", "a number in [0, 1]", self.lr_min_ratio)
        require(self.lr_step_epochs >= 1, "train.lr_step_epochs", "an integer >= 1", self.lr_step_epochs)
        require(_finite(self.lr_step_gamma) and 0 < self.lr_step_gamma <= 1, "train.lr_step_gamma", "a number in (0, 1]", self.lr_step_gamma)
        require(self.early_stopping_patience >= 0, "train.early_stopping_patience", "an integer >= 0", self.early_stopping_patience)
        require(_finite(self.early_stopping_min_delta) and self.early_stopping_min_delta >= 0,
                 "train.early_stopping_min_delta", "a number >= 0", self.early_stopping_min_delta)
        require(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", self.precision)
        require(self.deepspeed_zero_stage in (0, 1, 2), "train.deepspeed_zero_stage", "0, 1 or 2", self.deepspeed_zero_stage)
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "an integer >= 1", self.keep_checkpoints)
        from fvae_dist.accel import canonical, enabled_paths

        object.__setattr__(self, "cpu_kernels", canonical(self.cpu_kernels))  # YAML's off is False
        enabled_paths(self.cpu_kernels)  # ConfigError naming train.cpu_kernels when unknown
        require(_finite(self.index_share) and 0 <= self.index_share <= 1, "train.index_share", "a number in [0, 1]",
                self.index_share)
        require(self.index_share == 0 or bool(self.index_membership), "train.index_membership",
                "a membership file (instrument, start_date, end_date) when train.index_share > 0", self.index_membership)
        if self.index_membership:  # absolute now: Tune's trial actors run in folders of their own
            object.__setattr__(self, "index_membership", str(Path(self.index_membership).expanduser().resolve()))
        require(self.torch_threads >= 0, "train.torch_threads", "an integer >= 0 (0 = from ray.cpus_per_worker)", self.torch_threads)


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the run goes."""

    num_workers: int = 2
    """Data-parallel training workers (DDP processes)."""

    cpus_per_worker: float = 0.5
    """CPUs Ray reserves per worker. Fractional on purpose: on a small machine the workers must
    not take every CPU, or Ray Data gets none and the input pipeline waits forever. The run
    checks that num_workers * cpus_per_worker leaves at least one CPU free."""

    use_gpu: bool = False
    """One GPU per worker, NCCL between them; CPU workers use gloo."""

    run_name: str = "fvae"
    """Run folder name under storage_path. Re-running with the same name resumes that run."""

    storage_path: str = "runs"
    """Parent of run folders: a local or shared directory, or a URI pyarrow and Ray accept
    (s3://bucket/runs, gs://..., hdfs://...) for clusters whose nodes share only a bucket.
    Everything a run writes goes there; credentials come from the environment (storage.py)."""

    address: str = ""
    """Ray cluster to join ("auto", "ray://host:10001"); empty starts a local Ray instance."""

    num_cpus: int = 0
    """CPUs a local Ray instance may use; 0 = all CPUs of this machine. Ignored with address."""

    max_failures: int = 2
    """Times Ray Train restarts the worker group after a worker failure (resuming from the
    latest checkpoint) before the run fails: a lost node or a killed worker costs at most the
    epoch in progress instead of the run. -1 = unlimited, 0 = the first failure ends the run."""

    log_level: str = "WARNING"
    """Level of Ray Train's own console logs (its INFO level prints every report)."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "ray.num_workers", "an integer >= 1", self.num_workers)
        require(_finite(self.cpus_per_worker) and self.cpus_per_worker > 0, "ray.cpus_per_worker",
                 "a number > 0 (fractions such as 0.5 are fine)", self.cpus_per_worker)
        require(bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
                 "ray.run_name", "a non-empty folder name without '/'", self.run_name)
        require(bool(self.storage_path), "ray.storage_path", "a directory or a URI such as s3://bucket/runs",
                self.storage_path)
        if is_uri(self.storage_path):
            UriPath.parse(self.storage_path)  # ConfigError naming a malformed URI
        require(self.num_cpus >= 0, "ray.num_cpus", "an integer >= 0 (0 = all CPUs)", self.num_cpus)
        require(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "ray.log_level",
                 "DEBUG, INFO, WARNING, ERROR or CRITICAL", self.log_level)
        require(self.max_failures >= -1, "ray.max_failures", "an integer >= -1 (-1 = unlimited)", self.max_failures)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run depends on; resolved and saved as <run>/config.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.train.precision == "fp16" and not self.ray.use_gpu:
            raise ConfigError("train.precision=fp16 needs CUDA (ray.use_gpu=true); on CPU use train.precision=bf16")

    @property
    def run_dir(self) -> "Path | UriPath":
        """<ray.storage_path>/<ray.run_name>: absolute, or a URI (storage.location)."""
        return location(self.ray.storage_path) / self.ray.run_name


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "ray": RayConfig}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML preset (or start from the defaults when path is None) and apply overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml_mapping(path, what="config file", sections=sorted(SECTIONS))
    for text in overrides:
        key, value = parse_override(text)
        section, name = _split_key(key, source="override")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        data[section][name] = value
    return config_from_dict(data, source=source)


def read_yaml_mapping(path: str | Path, *, what: str, sections: Sequence[str]) -> dict:
    """The mapping a YAML file holds ({} for an empty file); ConfigError naming the file when it
    is missing, not YAML, or not a mapping of `sections`."""
    try:
        loaded = yaml.safe_load((location(path) if is_uri(path) else Path(path)).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(sections)}, got {type(loaded).__name__}")
    return dict(loaded or {})


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001). The value is read as YAML; the field type decides."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key such as train.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(data: Mapping, *, source: str = "config") -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested plain data (YAML, a checkpoint, Tune)."""
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}{nearest_name_hint(unknown[0], SECTIONS)}")
    sections = {}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        sections[section] = _build_section(cls, section, values, source)
    return ExperimentConfig(**sections)


def with_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of cfg with dotted-key overrides applied (what Tune and the robustness job use)."""
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        section, name = _split_key(key, source="override")
        data[section][name] = value
    return config_from_dict(data, source="overrides")


def with_data_features(cfg: ExperimentConfig, manifest: Mapping, manifest_path: str | Path) -> ExperimentConfig:
    """cfg with model.num_features (C) from the data set: 0, the default, takes the number of features
    its manifest lists; a number given must agree with it (ConfigError otherwise)."""
    features = list(manifest.get("features") or [])
    if not features:
        raise ConfigError(f"{manifest_path}: lists no features; expected a data set written by `fvae-dist prepare`")
    given = cfg.model.num_features
    if given == 0:
        return with_overrides(cfg, {"model.num_features": len(features)})
    if given != len(features):
        raise ConfigError(
            f"model.num_features={given}, but the data set's {manifest_path} lists {len(features)} features "
            f"(feature set {manifest.get('feature_set', '?')}); leave model.num_features at 0 to take the data "
            f"set's, or set {len(features)}"
        )
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """Nested plain data (lists for tuples) that YAML, JSON and torch.load(weights_only) accept."""
    return {section: _plain(dataclasses.asdict(getattr(cfg, section))) for section in SECTIONS}


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    write_text_atomic(path, text)


def write_text_atomic(path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a torn file (a
    local path or a storage URI's: storage.write_text_atomic)."""
    from fvae_dist.storage import write_text_atomic as write

    write(path, text)


def json_safe(value: Any) -> Any:
    """`value` as strict JSON accepts it: NaN and infinities become null, numpy scalars Python
    numbers, tuples lists, keys strings."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. for help texts."""
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------------------------

def build_settings(cls: type, values: Mapping, *, where: str, source: str, valid_keys=None):
    """A settings dataclass from plain values (YAML), each coerced by its field's type with the
    rules of this module (so `true`, `yes` and `1` are the same boolean everywhere). Unknown keys
    and the dataclass's own checks raise ConfigError naming `source` and `where`.KEY; the hint for
    an unknown key is drawn from `valid_keys` (default: the dataclass's fields)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            key = f"{where}.{name}"
            candidates = valid_keys if valid_keys is not None else [f"{where}.{f}" for f in sorted(fields)]
            raise ConfigError(f"{source}: unknown key {key}{nearest_name_hint(key, candidates)}")
        kwargs[name] = value if dataclasses.is_dataclass(value) else _coerce(value, hints[name], f"{where}.{name}", source)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _build_section(cls: type, section: str, values: Mapping, source: str):
    return build_settings(cls, values, where=section, source=source, valid_keys=all_keys())


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key, source)
    if origin is tuple:
        item_type = typing.get_args(kind)[0]
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} expects a list, got {value!r}")
        return tuple(_coerce(item, item_type, key, source) for item in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{source}: {key} expects true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{source}: {key} expects an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {key} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} expects a number, got {value!r}") from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: {key} expects a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _split_key(key: str, *, source: str) -> tuple[str, str]:
    section, dot, name = key.partition(".")
    if not dot or not name or "." in name:
        raise ConfigError(f"{source}: key {key!r} must be SECTION.NAME{nearest_name_hint(key, all_keys())}")
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown key {key!r}{nearest_name_hint(key, all_keys())}")
    return section, name


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, expected: str, got: Any) -> None:
    """The settings dataclasses' checks: ConfigError "KEY: expected ..., got ..." unless ok."""
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")
