"""Driver side of a training run: the run folder, Ray, the datasets and the TorchTrainer.

    train(cfg) -> TrainingOutcome           what `fvae-dist train` calls
    build_trainer(cfg, ...) -> TorchTrainer  for callers that drive fit() themselves (Tune trials,
                                             the robustness grid): same loop, same run folder

The run folder <ray.storage_path>/<ray.run_name>/ holds
    config.yaml          the resolved config            manifest_hash.txt   the data it was trained on
    metrics.json         per-epoch history, best epoch, final valid/test metrics (rank 0)
    tensorboard/         events (rank 0)                checkpoint_epochNNNN/  Ray Train checkpoints
    predictions/         written later by `fvae-dist predict`
Re-running with the same run name resumes: Ray Train V2 restores its checkpoint list from the
run folder, ray.train.get_checkpoint() hands the latest one to the workers.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ray
import ray.train
import yaml
from ray.train.torch import TorchConfig, TorchTrainer

from fvae_dist.config import ExperimentConfig, config_to_dict, dump_config, write_text_atomic
from fvae_dist.data.shards import load_manifest, manifest_hash
from fvae_dist.data.stream import DaySplitConfig, day_blocks, epoch_seed, shuffled_each_epoch
from fvae_dist.errors import ConfigError, DataError, FvaeError
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.train import core_layout, ray_logging
from fvae_dist.train.cpu_memory import WORKER_ENV_VARS
from fvae_dist.train.loop import METRICS_FILE, intra_op_threads, train_loop_per_worker

CONFIG_FILE = "config.yaml"
MANIFEST_HASH_FILE = "manifest_hash.txt"


@dataclass
class TrainingOutcome:
    run_dir: Path
    metrics: dict  # the content of metrics.json
    result: ray.train.Result


def train(cfg: ExperimentConfig, *, callbacks: Sequence = (), model_builder: Callable | None = None) -> TrainingOutcome:
    """Run (or resume) one training run and return its metrics."""
    trainer = build_trainer(cfg, callbacks=callbacks, model_builder=model_builder)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = _user_error(exc)
        if cause is exc:
            raise
        raise cause from exc
    run_dir = run_dir_of(cfg)
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    prune_unregistered_checkpoints(result, cfg)
    return TrainingOutcome(run_dir=run_dir, metrics=metrics, result=result)


def prune_unregistered_checkpoints(result: ray.train.Result, cfg: ExperimentConfig) -> None:
    """train.keep_checkpoints for the checkpoints a crash kept Ray from registering (see
    checkpoint.prune_unregistered), after fit(): Ray's own pruning only knows the ones it
    registered."""
    run_dir = run_dir_of(cfg)
    metrics_path = run_dir / METRICS_FILE
    history = json.loads(metrics_path.read_text()).get("history", []) if metrics_path.is_file() else []
    registered = [checkpoint.path for checkpoint, _ in result.best_checkpoints or []]
    if result.checkpoint is not None:
        registered.append(result.checkpoint.path)
    for path in ckpt.prune_unregistered(run_dir, registered, cfg.train.keep_checkpoints, history):
        print(f"deleted {path.name}: written before a crash, never registered by Ray Train, and not among the "
              f"{cfg.train.keep_checkpoints} best (train.keep_checkpoints)")


def build_trainer(
    cfg: ExperimentConfig,
    *,
    callbacks: Sequence = (),
    model_builder: Callable | None = None,
) -> TorchTrainer:
    """Prepare the run folder and datasets and return the TorchTrainer (fit() not called)."""
    dataset_dir = _dataset_dir(cfg)
    data_hash = manifest_hash(dataset_dir)
    manifest = load_manifest(dataset_dir)
    run_dir = run_dir_of(cfg)
    check_resume_allowed(run_dir, cfg, data_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG_FILE)
    write_text_atomic(run_dir / MANIFEST_HASH_FILE, data_hash + "\n")

    ensure_ray(cfg, for_one_run=True)
    check_cluster_fits(cfg)
    training_cores = training_cores_for(cfg)
    splits = manifest["splits"]
    for role in ("train_split", "valid_split"):
        name = getattr(cfg.data, role)
        if name not in splits:
            raise DataError(f"{dataset_dir}/manifest.json: data.{role}={name!r} is not a split; it has {sorted(splits)}")
    blocks = dict(days_per_block=cfg.data.days_per_block, drop_nan_label=True,
                  exclude_instruments=cfg.data.exclude_instruments)
    train_blocks = day_blocks(dataset_dir, cfg.data.train_split, **blocks)
    datasets = {
        # A callable: Ray Train evaluates it each time it (re)starts the worker group, so a
        # restarted run seeds its day shuffle from the epoch it resumes at.
        "train": lambda: shuffled_each_epoch(train_blocks, epoch_seed(cfg.train.seed, completed_epochs(run_dir))),
        cfg.data.valid_split: day_blocks(dataset_dir, cfg.data.valid_split, **blocks),
    }
    eval_splits = [cfg.data.valid_split]
    if cfg.data.test_split in splits and cfg.data.test_split not in datasets:
        datasets[cfg.data.test_split] = day_blocks(dataset_dir, cfg.data.test_split, **blocks, materialize=False)
        eval_splits.append(cfg.data.test_split)

    loop_config = {
        "config": config_to_dict(cfg),
        "manifest_hash": data_hash,
        "run_dir": str(run_dir),
        "eval_splits": eval_splits,
        "model_builder": model_builder,
        "training_cores": training_cores,  # per rank, or None: see train/core_layout.py
    }
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.ray.run_name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="max",
            ),
            callbacks=list(callbacks) or None,
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray.log_level.upper()),
            # every worker thread in glibc's main arena: see train/cpu_memory.py
            worker_runtime_env={"env_vars": dict(WORKER_ENV_VARS)},
        ),
        datasets=datasets,
        dataset_config=DaySplitConfig(equal_split=("train",)),
    )


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.ray.storage_path).expanduser() / cfg.ray.run_name).resolve()


def completed_epochs(run_dir: Path) -> int:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    return int(json.loads(path.read_text()).get("epochs_completed", 0))


def check_resume_allowed(run_dir: Path, cfg: ExperimentConfig, data_hash: str) -> None:
    """Before anything starts: an existing run with checkpoints may only be continued on the same
    data set, with the same model and the same held-out stocks."""
    if not ckpt.list_checkpoints(run_dir):
        return
    saved_config_path = run_dir / CONFIG_FILE
    saved_hash_path = run_dir / MANIFEST_HASH_FILE
    if not (saved_config_path.is_file() and saved_hash_path.is_file()):
        raise ConfigError(f"{run_dir}: has checkpoints but no {CONFIG_FILE} / {MANIFEST_HASH_FILE}; "
                          "it was not written by `fvae-dist train`. Use another ray.run_name.")
    saved_config = yaml.safe_load(saved_config_path.read_text()) or {}
    saved_hash = saved_hash_path.read_text().strip()
    ckpt.check_resumable(saved_config, saved_hash, config_to_dict(cfg), data_hash, str(run_dir))


# The local cluster this process started, as (node id, core layout or None).
_local_cluster: tuple[str, core_layout.CoreLayout | None] | None = None


def ensure_ray(cfg: ExperimentConfig, *, for_one_run: bool = False) -> None:
    """Join ray.address, or start a local Ray sized by ray.num_cpus (all CPUs by default).

    for_one_run: the cluster is started for one training run (`fvae-dist train`), which may then
    lay out the cores (ray.pin_cores, train/core_layout.py). Tune and the robustness grid start
    theirs without: their trials run side by side and must not share pinned cores."""
    global _local_cluster
    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # an existing cluster brings its own CPU count; num_cpus may not be passed then
        ray.init(address=cfg.ray.address or None, log_to_driver=True)
        return
    num_cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    layout = planned_core_layout(cfg) if for_one_run else None
    confined = (core_layout.new_processes_confined_to(layout.housekeeping, core_layout.available_cpus())
                if layout is not None else contextlib.nullcontext())
    with confined:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": ray_logging.WORKER_SETUP_HOOK})
    _local_cluster = (ray.get_runtime_context().get_node_id(), layout)
    if layout is not None:
        print(f"local Ray cluster: {layout.describe()} (ray.pin_cores)")


def planned_core_layout(cfg: ExperimentConfig) -> core_layout.CoreLayout | None:
    """The layout a local cluster started for this run gets (None: nothing pinned)."""
    if not cfg.ray.pin_cores or cfg.ray.use_gpu or not core_layout.affinity_supported():
        return None
    return core_layout.plan_core_layout(cfg.ray.num_workers, intra_op_threads(cfg), core_layout.available_cpus())


def training_cores_for(cfg: ExperimentConfig) -> tuple[tuple[int, ...], ...] | None:
    """Each rank's cores when this process started the cluster with a core layout that fits this
    run's workers; None otherwise (the workers then widen to the node's CPUs if the cluster's
    housekeeping was confined, see core_layout.pin_training_thread)."""
    if _local_cluster is None or not ray.is_initialized() or cfg.ray.use_gpu or not cfg.ray.pin_cores:
        return None
    node_id, layout = _local_cluster
    if layout is None or node_id != ray.get_runtime_context().get_node_id():
        return None  # not pinned, or a different cluster than the one this process started
    threads = intra_op_threads(cfg)
    pinned = [cpu for cpus in layout.training for cpu in cpus]
    if cfg.ray.num_workers * threads > len(pinned):
        return None
    return core_layout.per_rank(pinned, cfg.ray.num_workers, threads)


def check_cluster_fits(cfg: ExperimentConfig) -> None:
    """The workers must leave at least one CPU to Ray Data, or the input pipeline never runs
    and training waits forever (seen with 2 workers x 1 CPU on a 2-CPU machine)."""
    total_cpus = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if need > total_cpus - 1 + 1e-9:
        suggestion = max((total_cpus - 1) / cfg.ray.num_workers, 0.0)
        raise ConfigError(
            f"ray.num_workers={cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} = {need:g} CPUs, "
            f"but the Ray cluster has {total_cpus:g} and Ray Data needs at least 1 free; "
            + (f"use ray.cpus_per_worker={suggestion:.2g} or fewer workers"
               if suggestion > 0 else "this cluster is too small: use a machine with at least 2 CPUs")
        )
    if cfg.ray.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < cfg.ray.num_workers:
            raise ConfigError(f"ray.use_gpu=true with ray.num_workers={cfg.ray.num_workers}, "
                              f"but the Ray cluster has {gpus:g} GPUs")


def _dataset_dir(cfg: ExperimentConfig) -> Path:
    if not cfg.data.dataset_dir:
        raise ConfigError("data.dataset_dir is empty: set it in the config file or pass data.dataset_dir=DIR")
    path = Path(cfg.data.dataset_dir).expanduser().resolve()
    load_manifest(path)  # raises DataError naming the file when it is not a prepared data set
    return path


def _user_error(exc: Exception) -> Exception:
    """A worker's own FvaeError (bad resume, bad data) instead of Ray's wrapper around it."""
    failures = getattr(exc, "worker_failures", None) or {}
    for failure in failures.values():
        seen = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, FvaeError):
                return type(failure)(str(failure).splitlines()[0] if str(failure) else repr(failure))
            failure = getattr(failure, "cause", None) or failure.__cause__
    return exc
