"""Predictions of a finished run: <run>/predictions/<split>.parquet from the best checkpoint.

Only the model's prediction path is used: for FactorVAE, feature extractor -> factor predictor
-> decoder (eqs. 18-19), the encoder, which reads future returns, never runs; a baseline's
predict() never reads the label either, and its sigma is NaN (it has no risk estimate).
Every stock-day of the split is scored, including stocks the run held out of training
(data.exclude_instruments) and stocks without a realised label (label is NaN there):
evaluation decides what to skip.

Columns: date (datetime64[ns]), instrument, mu, sigma, label [, beta_0 .. beta_{K-1}: FactorVAE only].
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fvae_dist.config import ExperimentConfig, load_config
from fvae_dist.data.shards import collate_days, iter_shard_days, load_manifest, manifest_hash, shard_entries
from fvae_dist.errors import ConfigError
from fvae_dist.storage import UriPath, location
from fvae_dist.models.registry import is_factorvae
from fvae_dist.train import checkpoint as ckpt

PREDICTION_COLUMNS = ["date", "instrument", "mu", "sigma", "label"]


def run_config(run_dir) -> ExperimentConfig:
    path = location(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; expected a run folder written by `fvae-dist train`")
    return load_config(path)


def load_best_model(run_dir: str | Path, cfg: ExperimentConfig | None = None):
    """The model (whichever model.name names) with the best validation epoch's weights, in eval
    mode, on CPU."""
    from fvae_dist.models.registry import build_model

    cfg = cfg or run_config(run_dir)
    try:
        path = ckpt.best_checkpoint(run_dir)
        weights = ckpt.load(path / ckpt.STATE_FILE)["model"]
    except ConfigError:
        # Ray may have pruned the best epoch's folder (keep_checkpoints); every checkpoint
        # carries the best weights so far, so the latest one has the same weights.
        kept = ckpt.list_checkpoints(run_dir)
        if not kept:
            raise
        path = kept[-1]
        weights = ckpt.load(path / ckpt.STATE_FILE)["best_model"]
    model = build_model(cfg.model)
    model.load_state_dict(weights)
    return model.eval(), path


def predict_split(
    run_dir: str | Path,
    split: str = "test",
    *,
    dataset_dir: str | Path | None = None,
    batch_days: int = 16,
    exposures: bool = False,
    allow_other_data: bool = False,
    threads: int = 0,
) -> Path:
    """Score every stock-day of `split` and write <run>/predictions/<split>.parquet atomically."""
    run_dir = location(run_dir)  # a local path or a storage URI
    cfg = run_config(run_dir)
    if exposures and not is_factorvae(cfg.model):
        raise ConfigError(f"{run_dir / 'config.yaml'}: factor exposures (betas) exist only for FactorVAE; this run "
                          f"trained model.name={cfg.model.name}. Predict without --exposures.")
    dataset_dir = location(dataset_dir or cfg.data.dataset_dir)
    manifest = load_manifest(dataset_dir)
    _check_same_data(run_dir, dataset_dir, allow_other_data)
    if threads:
        torch.set_num_threads(threads)
    model, _ = load_best_model(run_dir, cfg)

    frames = []
    for entry in shard_entries(manifest, split):
        days = iter_shard_days(dataset_dir, entry, drop_nan_label=False, manifest=manifest)
        while chunk := list(itertools.islice(days, batch_days)):  # a shard's windows never all in memory
            frames.append(_score_days(model, chunk, exposures))
    if not frames:
        raise ConfigError(f"{dataset_dir}: split {split!r} has no days to predict")
    predictions = pd.concat(frames, ignore_index=True).sort_values(["date", "instrument"], kind="stable")
    out = run_dir / "predictions" / f"{split}.parquet"
    _write_parquet_atomic(predictions.reset_index(drop=True), out)
    return out


@torch.inference_mode()
def _score_days(model, days, exposures: bool) -> pd.DataFrame:
    batch = collate_days(days)
    x = torch.from_numpy(batch["x"])
    mask = torch.from_numpy(batch["mask"])
    mu, sigma = model.predict(x, mask)  # (D, N): never reads y (FactorVAE: prior + decoder, no encoder)
    beta = model.factor_exposures(x, mask).numpy() if exposures else None
    mask_np = batch["mask"]
    frame = pd.DataFrame(
        {
            "date": np.repeat(np.array([d.date for d in days], dtype="datetime64[ns]"), mask_np.sum(axis=1)),
            "instrument": np.concatenate([d.instruments for d in days]).astype(str),
            "mu": mu.numpy()[mask_np].astype(np.float32),
            "sigma": sigma.numpy()[mask_np].astype(np.float32),
            "label": batch["label"][mask_np].astype(np.float32),
        }
    )
    if beta is not None:
        for k in range(beta.shape[-1]):
            frame[f"beta_{k}"] = beta[..., k][mask_np].astype(np.float32)
    return frame


def _check_same_data(run_dir, dataset_dir: Path, allow_other_data: bool) -> None:
    saved_path = run_dir / "manifest_hash.txt"
    saved = saved_path.read_text().strip() if saved_path.is_file() else None
    current = manifest_hash(dataset_dir)
    if saved is not None and saved != current and not allow_other_data:
        raise ConfigError(
            f"{dataset_dir}: manifest hash {current} differs from the run's {saved} ({run_dir}/manifest_hash.txt); "
            "pass --allow-other-data to score a different data set with this model"
        )


def _write_parquet_atomic(frame: pd.DataFrame, path) -> None:
    if isinstance(path, UriPath):  # one upload, complete or absent
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path.path, filesystem=path.fs)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
