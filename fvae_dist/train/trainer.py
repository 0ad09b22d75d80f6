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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from fvae_dist import accel
from fvae_dist.config import ExperimentConfig, config_to_dict, dump_config, with_data_features, write_text_atomic
from fvae_dist.data.bars import read_membership
from fvae_dist.data.shards import MANIFEST_NAME, check_shards_readable, load_manifest, manifest_hash
from fvae_dist.data.stream import DaySplitConfig, day_blocks, epoch_seed, shuffled_each_epoch
from fvae_dist.errors import ConfigError, DataError, user_error
from fvae_dist.job_paths import require_durable
from fvae_dist.storage import UriPath, arrow_path, location, read_json
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.train.bound_store import BoundStoreTorchConfig
from fvae_dist.train.cluster_fit import RunShape, check_fits, cluster_nodes
from fvae_dist.train.local_ray import join_ray, start_local_ray
from fvae_dist.train.loop import METRICS_FILE, train_loop_per_worker
from fvae_dist.train.lost_workers import lost_workers_error

CONFIG_FILE = "config.yaml"
MANIFEST_HASH_FILE = "manifest_hash.txt"
# How often Ray Train tries to start a restarted worker group that the cluster cannot place (a
# lost node held what the others cannot), each try waiting 60 s: Ray 2.60 tries without end
# (FailureConfig.controller_failure_limit=-1), and the run then hangs until the node is back. Ten
# give a returning node (an autoscaler's new one) ten minutes; then the run ends with one line
# (train/lost_workers.py), and rerunning it resumes.
WORKER_GROUP_START_ATTEMPTS = 10


@dataclass
class TrainingOutcome:
    run_dir: Path
    metrics: dict  # the content of metrics.json
    result: ray.train.Result


def train(cfg: ExperimentConfig, *, callbacks: Sequence = (), model_builder: Callable | None = None) -> TrainingOutcome:
    """Run (or resume) one training run and return its metrics."""
    trainer = build_trainer(cfg, callbacks=callbacks, model_builder=model_builder)
    try:
        result = fit(trainer)
    except ray.train.TrainingFailedError as exc:
        lost = lost_workers_error(exc, cfg.ray.run_name, completed_epochs(run_dir_of(cfg)), cfg.train.epochs,
                                  cfg.ray.max_failures)
        if lost is None:
            raise
        raise lost from exc
    run_dir = run_dir_of(cfg)
    metrics = read_json(run_dir / METRICS_FILE) or {}
    prune_unregistered_checkpoints(result, cfg)
    return TrainingOutcome(run_dir=run_dir, metrics=metrics, result=result)


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """trainer.fit(), raising a worker's own FvaeError (bad resume, bad data) instead of Ray's
    wrapper around it, so that the CLI prints one clear line."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        mine = user_error(exc)
        if mine is None:
            raise
        raise mine from exc


def prune_unregistered_checkpoints(result: ray.train.Result, cfg: ExperimentConfig) -> None:
    """train.keep_checkpoints for the checkpoints a crash kept Ray from registering (see
    checkpoint.prune_unregistered), after fit(): Ray's own pruning only knows the ones it
    registered."""
    run_dir = run_dir_of(cfg)
    history = (read_json(run_dir / METRICS_FILE) or {}).get("history", [])
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
    require_durable("data.dataset_dir", cfg.data.dataset_dir)  # inside a Ray job: not in its temporary copy
    require_durable("ray.storage_path", cfg.ray.storage_path)
    dataset_dir = _dataset_dir(cfg)
    data_hash = manifest_hash(dataset_dir)
    manifest = load_manifest(dataset_dir)
    cfg = with_data_features(cfg, manifest, dataset_dir / MANIFEST_NAME)  # model.num_features: 0 -> C
    # read here, so a bad file fails before anything is written, and workers need no access to it
    membership = read_membership(cfg.train.index_membership) if cfg.train.index_share > 0 else None
    run_dir = run_dir_of(cfg)
    check_resume_allowed(run_dir, cfg, data_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG_FILE)
    write_text_atomic(run_dir / MANIFEST_HASH_FILE, data_hash + "\n")

    ensure_ray(cfg)
    check_cluster_fits(cfg)
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
        "index_membership": membership,
    }
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    device_type = "cuda" if cfg.ray.use_gpu else "cpu"
    storage_path, storage_filesystem = arrow_path(run_dir.parent)
    accel.build_ahead(cfg.train.cpu_kernels, device_type)  # workers on this node then find it built
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # rank 0's rendezvous store listens on the master address only, not on every interface
        torch_config=BoundStoreTorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.ray.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures,
                                                   controller_failure_limit=WORKER_GROUP_START_ATTEMPTS),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="max",
            ),
            callbacks=list(callbacks) or None,
            logging_config=ray.train.LoggingConfig(log_level=cfg.ray.log_level.upper()),
            worker_runtime_env={"env_vars": accel.worker_env_vars(cfg.train.cpu_kernels, device_type)},
        ),
        datasets=datasets,
        dataset_config=DaySplitConfig(equal_split=("train",)),
    )


def run_dir_of(cfg: ExperimentConfig) -> "Path | UriPath":
    """The run folder: an absolute local path, or a URI (storage.py)."""
    return cfg.run_dir


def completed_epochs(run_dir: "Path | UriPath") -> int:
    return int((read_json(run_dir / METRICS_FILE) or {}).get("epochs_completed", 0))


def check_resume_allowed(run_dir: "Path | UriPath", cfg: ExperimentConfig, data_hash: str) -> None:
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


def ensure_ray(cfg: ExperimentConfig) -> None:
    """Join ray.address (or RAY_ADDRESS, set inside a Ray job), or start a local Ray sized by
    ray.num_cpus (all CPUs by default): on 127.0.0.1 only, with token authentication, its
    dashboard, and ended with this process (train/local_ray.py).

    The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner asks whether a
    run's controller is still alive: when a controller dies without removing its workers'
    placement group (the trial actor of a Tune trial that a scheduler stops, ray-project/ray
    #54305), the cleaner removes it, or those CPUs stay reserved until the driver exits."""
    if ray.is_initialized():
        return
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # an existing cluster brings its own CPU count; num_cpus may not be passed then
        join_ray(cfg.ray.address)
        return
    start_local_ray(cfg.ray.num_cpus or os.cpu_count() or 1)


def check_cluster_fits(cfg: ExperimentConfig) -> None:
    """The run's workers must leave Ray Data its CPU (train/cluster_fit.py)."""
    try:
        check_fits(RunShape.of(cfg), cluster_nodes())
    except ConfigError as exc:
        raise ConfigError(f"{cfg.ray.run_name}: {exc}") from None


def _dataset_dir(cfg: ExperimentConfig) -> "Path | UriPath":
    if not cfg.data.dataset_dir:
        raise ConfigError("data.dataset_dir is empty: set it in the config file or pass data.dataset_dir=DIR")
    path = location(cfg.data.dataset_dir)  # a directory or a storage URI
    # DataError naming the file when it is not a prepared data set, or a shard is cut short or
    # missing: refused before Ray starts rather than from inside a Ray Data task
    check_shards_readable(path, load_manifest(path)["shards"])
    return path
