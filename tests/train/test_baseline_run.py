"""Baselines through the same training path as FactorVAE: 2 Ray Train workers, then predict."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fvae_dist.config import load_config
from fvae_dist.data.shards import iter_shard_days, load_manifest, shard_entries
from fvae_dist.errors import ConfigError
from fvae_dist.train import checkpoint as ckpt
from fvae_dist.train.predict import predict_split
from fvae_dist.train.trainer import train
from tests.toy_dataset import tiny_overrides

pytestmark = [pytest.mark.ray]


def _baseline_cfg(toy_dir, storage, name: str, *extra):
    return load_config(None, tiny_overrides(toy_dir, storage, f"baseline-{name}", f"model.name={name}",
                                            "train.epochs=2", "train.lr=3e-3", "train.early_stopping_patience=0",
                                            "ray.num_workers=2", "ray.cpus_per_worker=0.5", *extra))


def _split_stock_days(toy_dir, split: str) -> set[tuple[np.datetime64, str]]:
    manifest = load_manifest(toy_dir)
    keys = set()
    for entry in shard_entries(manifest, split):
        for day in iter_shard_days(toy_dir, entry, drop_nan_label=False, manifest=manifest):
            keys.update((np.datetime64(day.date, "ns"), str(i)) for i in day.instruments)
    return keys


@pytest.mark.timeout(300)
def test_gru_trains_on_two_workers_and_predicts_every_test_stock_day(ray_local, toy_dir, tmp_path):
    outcome = train(_baseline_cfg(toy_dir, tmp_path, "gru"))
    metrics = outcome.metrics
    assert metrics["epochs_completed"] == 2
    assert load_config(outcome.run_dir / "config.yaml").model.name == "gru"
    for h in metrics["history"]:
        # a point forecast: the loop's "nll" slot carries the MSE, there is no KL
        assert math.isfinite(h["train_loss"]) and h["train_kl"] == 0
        assert h["train_nll"] == pytest.approx(h["train_loss"])
    assert metrics["final"]["test"]["days"] == load_manifest(toy_dir)["splits"]["test"]["n_days"]

    frame = pd.read_parquet(predict_split(outcome.run_dir, "test"))
    keys = set(zip(frame["date"].to_numpy(), frame["instrument"]))
    assert len(keys) == len(frame) and keys == _split_stock_days(toy_dir, "test")
    assert np.isfinite(frame["mu"]).all() and frame["mu"].nunique() > 1
    assert frame["sigma"].isna().all()
    with pytest.raises(ConfigError, match="only for FactorVAE"):
        predict_split(outcome.run_dir, "test", exposures=True)


@pytest.mark.timeout(300)
def test_ca_factor_mean_is_averaged_over_the_workers_steps_and_checkpointed(ray_local, toy_dir, tmp_path):
    outcome = train(_baseline_cfg(toy_dir, tmp_path, "ca"))
    latest = ckpt.list_checkpoints(outcome.run_dir)[-1]
    weights = ckpt.load(latest / ckpt.STATE_FILE)["model"]
    steps = sum(h["train_steps"] for h in outcome.metrics["history"])
    # one update per synchronous step; each update all-reduces the step's factor mean, so a
    # worker that skipped or added one would have hung the run
    assert int(weights["factor_updates"]) == steps > 0
    assert torch.isfinite(weights["factor_mean"]).all() and weights["factor_mean"].abs().sum() > 0
    frame = pd.read_parquet(predict_split(outcome.run_dir, "test"))
    assert np.isfinite(frame["mu"]).all() and frame["sigma"].isna().all()
