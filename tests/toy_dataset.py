"""A tiny data set directory in the `fvae-dist prepare` layout, written in milliseconds.

Written directly (manifest.json + shards/<split>-<k>.parquet) rather than through prepare so that
the training tests depend only on the format that data/shards.py reads. The label is a noisy
linear function of the last day's features, so a model can learn a positive Rank IC.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def write_toy_dataset(
    out_dir: str | Path,
    *,
    n_stocks: int = 12,
    split_days: dict[str, int] | None = None,
    shards_per_split: dict[str, int] | None = None,
    seq_len: int = 5,
    n_features: int = 4,
    seed: int = 0,
    missing_label_rate: float = 0.05,
) -> Path:
    out_dir = Path(out_dir)
    split_days = split_days or {"train": 24, "valid": 8, "test": 8}
    shards_per_split = shards_per_split or {"train": 2, "valid": 1, "test": 1}
    rng = np.random.default_rng(seed)
    features = [f"F{i}" for i in range(n_features)]
    total_days = seq_len - 1 + sum(split_days.values())
    calendar = pd.bdate_range("2020-01-01", periods=total_days).to_numpy().astype("datetime64[D]")
    instruments = np.array([f"SH{600000 + i}" for i in range(n_stocks)])

    feats = rng.standard_normal((total_days, n_stocks, n_features)).astype(np.float32)
    weights = rng.standard_normal(n_features).astype(np.float32)
    label = feats @ weights * 0.02 + 0.02 * rng.standard_normal((total_days, n_stocks)).astype(np.float32)
    label[rng.random(label.shape) < missing_label_rate] = np.nan
    # each day one stock is out of the universe (a realistic ragged N)
    in_universe = np.ones((total_days, n_stocks), dtype=bool)
    in_universe[np.arange(total_days), np.arange(total_days) % n_stocks] = False

    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    splits, shards = {}, []
    first = seq_len - 1
    for split, n_days in split_days.items():
        own = np.arange(first, first + n_days)
        splits[split] = {"start": str(calendar[own[0]]), "end": str(calendar[own[-1]]), "n_days": int(n_days)}
        for k, part in enumerate(np.array_split(own, shards_per_split[split])):
            halo_start = part[0] - (seq_len - 1)
            days = np.arange(halo_start, part[-1] + 1)
            frame = _shard_frame(calendar, instruments, features, feats, label, in_universe, days, part)
            path = Path("shards") / f"{split}-{k:05d}.parquet"
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out_dir / path)
            shards.append(
                {
                    "path": str(path),
                    "split": split,
                    "own_start": str(calendar[part[0]]),
                    "own_end": str(calendar[part[-1]]),
                    "halo_start": str(calendar[halo_start]),
                    "n_days": int(len(part)),
                    "n_rows": int(len(frame)),
                }
            )
        first += n_days
    manifest = {
        "format_version": 1,
        "features": features,
        "seq_len": seq_len,
        "splits": splits,
        "shards": shards,
        "fingerprint": f"toy-{seed}-{n_stocks}-{total_days}",
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def _shard_frame(calendar, instruments, features, feats, label, in_universe, days, own_days) -> pd.DataFrame:
    n_stocks = len(instruments)
    own = np.isin(days, own_days)
    frame = pd.DataFrame(
        {
            "date": np.repeat(calendar[days], n_stocks).astype("datetime64[ns]"),
            "instrument": np.tile(instruments, len(days)),
        }
    )
    for c, name in enumerate(features):
        frame[name] = feats[days, :, c].reshape(-1)
    frame["label"] = label[days].reshape(-1)
    universe = (in_universe[days] & own[:, None]).reshape(-1)
    frame["in_universe"] = universe
    masked = frame["label"].where(universe)
    ranks = masked.groupby(frame["date"]).rank(pct=True)
    frame["label_norm"] = ((ranks - ranks.groupby(frame["date"]).transform("mean"))
                           / ranks.groupby(frame["date"]).transform("std")).astype(np.float32)
    return frame


def add_edge_cases(dataset_dir: str | Path, *, late_listed: str = "SH600005") -> Path:
    """Edit a toy data set (write_toy_dataset's) in place so that its shards hold the cases a
    reader must get right besides the plain day:

    - the first training shard carries no halo, as a split starting at the first day of the
      data does: its first windows are left-padded with zeros;
    - `late_listed` has no rows in that shard's first 6 days (a stock listed later): its first
      windows hold zeros before its first row;
    - in the second training shard, one day has no label at all (no sample once NaN labels are
      dropped) and the day after has no stock in the universe (no sample either way), both
      inside the shard, so later days' windows reach over them.
    """
    dataset_dir = Path(dataset_dir)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    train = [entry for entry in manifest["shards"] if entry["split"] == "train"]
    first, second = train[0], train[1]

    frame = pd.read_parquet(dataset_dir / first["path"])
    dates = np.sort(frame["date"].unique())
    own_start = np.datetime64(first["own_start"], "ns")
    frame = frame[frame["date"] >= own_start]
    early = np.sort(frame["date"].unique())[:6]
    frame = frame[~(frame["instrument"].eq(late_listed) & frame["date"].isin(early))]
    _rewrite(dataset_dir, first, frame)
    first["halo_start"] = first["own_start"]
    assert len(dates) > len(np.unique(frame["date"])), "the toy shard had a halo to drop"

    frame = pd.read_parquet(dataset_dir / second["path"])
    own_days = np.sort(frame.loc[frame["date"] >= np.datetime64(second["own_start"], "ns"), "date"].unique())
    no_label, no_universe = own_days[3], own_days[4]
    frame.loc[frame["date"].eq(no_label), ["label", "label_norm"]] = np.nan
    frame.loc[frame["date"].eq(no_universe), "in_universe"] = False
    frame.loc[frame["date"].eq(no_universe), "label_norm"] = np.nan
    _rewrite(dataset_dir, second, frame)
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dataset_dir


def _rewrite(dataset_dir: Path, entry: dict, frame: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), dataset_dir / entry["path"])
    entry["n_rows"] = int(len(frame))


# A model small enough that Ray's own start-up dominates a test run.
TINY_MODEL = ["model.num_features=4", "model.seq_len=5", "model.hidden_size=8", "model.num_factors=2",
              "model.num_portfolios=4"]
# train.cpu_kernels of every tiny run (tests/conftest.py sets it from --cpu-kernels)
CPU_KERNELS = "auto"


def tiny_overrides(dataset_dir, storage, run_name, *extra):
    """key=value overrides of a tiny training run on `dataset_dir` (later `extra` ones win)."""
    return [f"data.dataset_dir={dataset_dir}", f"ray.storage_path={storage}", f"ray.run_name={run_name}",
            *TINY_MODEL, f"train.cpu_kernels={CPU_KERNELS}", *extra]
