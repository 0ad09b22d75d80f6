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
import pyarrow as pa
import pyarrow.parquet as pq

from fvae_dist.data.processors import cs_rank_norm
from fvae_dist.errors import DataError
from fvae_dist.storage import arrow_path, location

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


def load_manifest(dataset_dir) -> dict:
    """The data set's manifest.json (a directory, or a storage URI's: storage.location)."""
    path = location(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest.json; expected a data set written by `fvae-dist prepare`")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "re-run `fvae-dist prepare`"
        )
    return manifest


def manifest_hash(dataset_dir: str | Path) -> str:
    """Hash of manifest.json: names the exact data a run was trained on."""
    content = (location(dataset_dir) / MANIFEST_NAME).read_bytes()
    return hashlib.sha256(content).hexdigest()[:16]


def shard_entries(manifest: dict, split: str) -> list[dict]:
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in the data set; it has {sorted(manifest['splits'])}")
    return [entry for entry in manifest["shards"] if entry["split"] == split]


SHARD_COLUMNS = ("date", "instrument", "label", "label_norm", "in_universe")  # besides the features


def unreadable_shard(path: str | Path, error: BaseException) -> DataError:
    """One line naming the shard and what is wrong with it, from the error pyarrow (or the OS)
    raised: a shard cut short by a full disk or an interrupted copy otherwise surfaces as a deep
    pyarrow traceback that names no file."""
    # pyarrow's message on one line: its lines joined, bytes it quotes from the file dropped
    lines = ["".join(c for c in line if c.isprintable()).strip().rstrip(" .:;") for line in str(error).splitlines()]
    detail = "; ".join(line for line in lines if line) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        what = "missing (the manifest lists it; was the data set moved or partly copied?)"
    elif isinstance(error, PermissionError):
        what = f"cannot be opened: {detail}"
    else:
        what = f"not a readable Parquet file (truncated or corrupt?): {detail}"
    return DataError(f"{path}: {what}; re-run `fvae-dist prepare` or restore the data set")


def read_shard_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """pq.read_table of one shard; DataError naming the file when it cannot be read."""
    source, filesystem = arrow_path(location(path))
    try:
        return pq.read_table(source, columns=columns, filesystem=filesystem)
    except (pa.ArrowException, OSError) as error:
        raise unreadable_shard(path, error) from error


def check_shards_readable(dataset_dir: str | Path, entries: list[dict]) -> None:
    """Open every shard's Parquet footer (a few KB each) and compare its row count with the
    manifest's: a truncated, missing or replaced shard is then refused with one line before
    any Ray task reads it, instead of failing inside Ray Data mid-run."""
    for entry in entries:
        path = location(dataset_dir) / entry["path"]
        source, filesystem = arrow_path(path)
        try:
            rows = pq.read_metadata(source, filesystem=filesystem).num_rows
        except (pa.ArrowException, OSError) as error:
            raise unreadable_shard(path, error) from error
        expected = entry.get("n_rows")
        if expected is not None and rows != int(expected):
            raise DataError(f"{path}: holds {rows} rows, the manifest says {expected} (replaced by another "
                            "data set's shard?); re-run `fvae-dist prepare` or restore the data set")


@dataclass
class ShardCube:
    """One shard in memory, the form both ways of cutting samples start from (`iter_shard_days`
    here, the day-panel blocks of data/day_blocks.py). Rows are the shard's rows, in file order."""

    dates: np.ndarray  # [D] datetime64[D], every day with a row (halo included), increasing
    instruments: np.ndarray  # [I] str, sorted
    cube: np.ndarray  # [D, I, C] float32; 0 (the normalised median) where a stock has no row
    own: np.ndarray  # [D] bool: the days this shard owns (its samples come from these)
    row_instrument: np.ndarray  # [R] int: each row's stock, an index into `instruments`
    day_bounds: np.ndarray  # [D + 1]: day d's rows are day_bounds[d] : day_bounds[d + 1]
    in_universe: np.ndarray  # [R] bool
    y: np.ndarray  # [R] float32, CSRankNorm target (re-ranked without the excluded stocks)
    label: np.ndarray  # [R] float32, raw LABEL0

    def sample_rows(self, day: int, drop_nan_label: bool) -> np.ndarray:
        """The rows that are samples on day `day` (universe stocks; with a target when
        drop_nan_label), in instrument order."""
        rows = np.arange(self.day_bounds[day], self.day_bounds[day + 1])
        rows = rows[self.in_universe[rows]]
        if drop_nan_label:
            rows = rows[np.isfinite(self.y[rows])]
        return rows


def read_shard(
    dataset_dir: str | Path,
    entry: dict,
    features: list[str],
    exclude_instruments: set[str] | frozenset[str] | None = None,
) -> ShardCube:
    """Read one shard (manifest entry `entry`) into a ShardCube.

    exclude_instruments: stocks removed entirely (the robustness experiment holds them out); the
    target is ranked again without them."""
    path = location(dataset_dir) / entry["path"]
    columns = [*SHARD_COLUMNS, *features]
    source, filesystem = arrow_path(path)
    try:
        names = pq.read_schema(source, filesystem=filesystem).names
    except (pa.ArrowException, OSError) as error:
        raise unreadable_shard(path, error) from error
    missing = [name for name in columns if name not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                        + "; the manifest's features and the shard format need it. Re-run `fvae-dist prepare`")
    frame = read_shard_table(path, columns).to_pandas()
    if exclude_instruments:
        frame = frame[~frame["instrument"].isin(exclude_instruments)]

    dates, date_idx = np.unique(frame["date"].to_numpy(dtype="datetime64[D]"), return_inverse=True)
    instruments, inst_idx = np.unique(frame["instrument"].to_numpy(dtype=str), return_inverse=True)
    # each day one contiguous run of rows (day_bounds) in instrument order, one row per stock
    if np.any(np.diff(date_idx.astype(np.int64) * len(instruments) + inst_idx) <= 0):
        raise DataError(f"{path}: rows are not sorted by (date, instrument) with one row per stock and day; "
                        "re-run `fvae-dist prepare`")
    cube = np.zeros((len(dates), len(instruments), len(features)), dtype=np.float32)
    cube[date_idx, inst_idx] = frame[features].to_numpy(dtype=np.float32)

    in_universe = frame["in_universe"].to_numpy(dtype=bool)
    y = frame["label_norm"].to_numpy(dtype=np.float32)
    label = frame["label"].to_numpy(dtype=np.float32)
    if exclude_instruments:
        # the stored CSRankNorm ranked the held-out stocks too; rank again without them so their
        # labels leave no trace in the training target
        y = cs_rank_norm(np.where(in_universe, label, np.nan), date_idx)
    own_start = np.datetime64(entry["own_start"], "D")
    own_end = np.datetime64(entry["own_end"], "D")
    return ShardCube(
        dates=dates,
        instruments=instruments,
        cube=cube,
        own=(own_start <= dates) & (dates <= own_end),
        row_instrument=inst_idx,
        day_bounds=np.searchsorted(date_idx, np.arange(len(dates) + 1)),
        in_universe=in_universe,
        y=y,
        label=label,
    )


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
    seq_len = int(manifest["seq_len"])
    shard = read_shard(dataset_dir, entry, manifest["features"], exclude_instruments)
    for day in np.flatnonzero(shard.own):
        rows = shard.sample_rows(day, drop_nan_label)
        if rows.size == 0:
            continue
        first = max(0, day - seq_len + 1)
        window = shard.cube[first : day + 1, shard.row_instrument[rows]]  # [t, N, C]
        x = np.zeros((rows.size, seq_len, shard.cube.shape[2]), dtype=np.float32)
        x[:, seq_len - window.shape[0] :] = window.transpose(1, 0, 2)  # left-pad a short history
        yield DaySample(
            date=shard.dates[day],
            instruments=shard.instruments[shard.row_instrument[rows]],
            x=x,
            y=shard.y[rows],
            label=shard.label[rows],
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
