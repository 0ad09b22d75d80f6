"""The prepared data set on disk, and how training samples are cut from it.

Layout of a data set directory (written by `fvae-dist prepare`, see data/prepare.py):

    manifest.json                  features, seq_len, splits, normalisation statistics, shards, fingerprints
    shards/<split>-<k>.parquet     day-level rows sorted by (date, instrument)

A shard row is one stock on one day: `date`, `instrument`, the normalised feature columns
(float32, clipped, NaN filled with 0), `label` (raw LABEL0, NaN allowed), `label_norm` (CSRankNorm
of the label over the day's universe, the training target) and `in_universe` (is this stock a sample
on this day). A shard owns the trading days [own_start, own_end] of one split and additionally
carries the `seq_len - 1` trading days before own_start (the "halo"), so every window can be cut
from the shard alone. Windows are never stored: a day sample is cut when read, which keeps disk
use at about (1 + halo/own days) of the day-level feature table instead of seq_len times it.

One training sample is ONE trading day: all its universe stocks with their [T, C] windows.
A stock that has no row on some day of its window (not yet listed, missing bar) gets zeros there,
which after RobustZScoreNorm + Fillna(0) is the neutral value.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from fvae_dist.data.processors import cs_rank_norm
from fvae_dist.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class DaySample:
    """One trading day: every universe stock with its feature window."""

    date: np.datetime64
    instruments: np.ndarray  # [N] str
    x: np.ndarray  # [N, T, C] float32
    y: np.ndarray  # [N] float32, training target (CSRankNorm of the label), NaN where missing
    label: np.ndarray  # [N] float32, raw LABEL0 for evaluation, NaN allowed


def load_manifest(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest.json; expected a data set written by `fvae-dist prepare`")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "re-run `fvae-dist prepare`"
        )
    return manifest


def manifest_hash(dataset_dir: str | Path) -> str:
    """Hash of manifest.json: names the exact data a run was trained on."""
    content = (Path(dataset_dir) / MANIFEST_NAME).read_bytes()
    return hashlib.sha256(content).hexdigest()[:16]


def shard_entries(manifest: dict, split: str) -> list[dict]:
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in the data set; it has {sorted(manifest['splits'])}")
    return [entry for entry in manifest["shards"] if entry["split"] == split]


def iter_shard_days(
    dataset_dir: str | Path,
    entry: dict,
    *,
    drop_nan_label: bool,
    exclude_instruments: set[str] | frozenset[str] | None = None,
    manifest: dict | None = None,
) -> Iterator[DaySample]:
    """Cut the day samples owned by one shard.

    drop_nan_label: DropnaLabel for training (a stock without a label is no sample that day).
    exclude_instruments: stocks removed entirely (the robustness experiment holds them out).
    """
    manifest = manifest or load_manifest(dataset_dir)
    features = manifest["features"]
    seq_len = int(manifest["seq_len"])
    table = pq.read_table(Path(dataset_dir) / entry["path"])
    frame = table.to_pandas()
    if exclude_instruments:
        frame = frame[~frame["instrument"].isin(exclude_instruments)]

    dates, date_idx = np.unique(frame["date"].to_numpy(dtype="datetime64[D]"), return_inverse=True)
    instruments, inst_idx = np.unique(frame["instrument"].to_numpy(dtype=str), return_inverse=True)
    # dense [days, instruments, C] cube of the shard; absent rows stay 0 (= the normalised median)
    cube = np.zeros((len(dates), len(instruments), len(features)), dtype=np.float32)
    cube[date_idx, inst_idx] = frame[features].to_numpy(dtype=np.float32)

    in_universe = frame["in_universe"].to_numpy(dtype=bool)
    y_all = frame["label_norm"].to_numpy(dtype=np.float32)
    if exclude_instruments:
        # the stored CSRankNorm ranked the held-out stocks too; rank again without them so their
        # labels leave no trace in the training target
        label_in_universe = np.where(in_universe, frame["label"].to_numpy(dtype=np.float32), np.nan)
        y_all = cs_rank_norm(label_in_universe, date_idx)
    label_all = frame["label"].to_numpy(dtype=np.float32)
    own_start = np.datetime64(entry["own_start"], "D")
    own_end = np.datetime64(entry["own_end"], "D")
    # rows are sorted by (date, instrument): each day is one contiguous run of rows
    day_bounds = np.searchsorted(date_idx, np.arange(len(dates) + 1))
    for day in range(len(dates)):
        if not own_start <= dates[day] <= own_end:
            continue
        rows = np.arange(day_bounds[day], day_bounds[day + 1])
        rows = rows[in_universe[rows]]
        if drop_nan_label:
            rows = rows[np.isfinite(y_all[rows])]
        if rows.size == 0:
            continue
        first = max(0, day - seq_len + 1)
        window = cube[first : day + 1, inst_idx[rows]]  # [t, N, C]
        x = np.zeros((rows.size, seq_len, len(features)), dtype=np.float32)
        x[:, seq_len - window.shape[0] :] = window.transpose(1, 0, 2)  # left-pad a short history
        yield DaySample(
            date=dates[day],
            instruments=instruments[inst_idx[rows]],
            x=x,
            y=y_all[rows],
            label=label_all[rows],
        )


def collate_days(samples: list[DaySample]) -> dict[str, np.ndarray]:
    """Stack days into one batch padded to the largest N, with a mask of real stocks."""
    if not samples:
        raise ValueError("collate_days needs at least one day")
    n_max = max(len(s.instruments) for s in samples)
    n_days = len(samples)
    _, seq_len, n_feat = samples[0].x.shape
    x = np.zeros((n_days, n_max, seq_len, n_feat), dtype=np.float32)
    y = np.zeros((n_days, n_max), dtype=np.float32)
    label = np.full((n_days, n_max), np.nan, dtype=np.float32)
    mask = np.zeros((n_days, n_max), dtype=bool)
    for d, sample in enumerate(samples):
        n = len(sample.instruments)
        x[d, :n] = sample.x
        y[d, :n] = np.nan_to_num(sample.y, nan=0.0)
        label[d, :n] = sample.label
        mask[d, :n] = True
    return {"x": x, "y": y, "label": label, "mask": mask}
