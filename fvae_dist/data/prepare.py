"""Raw bars -> features -> processors -> sharded Parquet data set, in bounded memory.

The pipeline never holds the whole market: it streams instrument chunks (a few hundred stocks
with their full history) through the feature code into a temporary instrument-major table, fits
the normalisation on the training span column by column, then cuts date-major shards from that
table with Parquet row-group filters. Everything is written under a temporary directory that is
renamed into place at the very end, so a crash or a bad input never leaves a half-written data set
that looks complete, and an existing data set is only replaced by a complete new one.

`fit_exclude_instruments` fits the normalisation as if those stocks did not exist in the training
span, while the shards still hold them (so they can be predicted later): the robustness experiment
needs this so that its held-out stocks do not shape the inputs the model is trained on. The
manifest records how to reopen the source (`settings.source_open`), so `data/reopen.prepare_like` can
rebuild a data set from the same source and settings with another such exclusion.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from fvae_dist import __version__
from fvae_dist.data.features import FEATURE_SETS, LABEL_NAME, features_frame
from fvae_dist.data.processors import RobustZScore, apply_robust_zscore, cs_rank_norm, fit_robust_zscore
from fvae_dist.data.shards import FORMAT_VERSION, MANIFEST_NAME
from fvae_dist.data.splits import Splits, resolve_splits
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.universe import member_mask
from fvae_dist.storage import UriPath, location, upload_file

# Every Alpha158 feature looks back at most 61 rows (CORD60, CNTP60, SUMP60, VSUMP60, WVMA60: a
# 60-day window of 1-day changes); reading this many extra days before the first window makes the
# features identical to a computation over the full history. (One exception, harmless after clipping: in an all-zero
# volume window Qlib's VSTD/WVMA are pandas' rounding leftovers divided by 1e-12, which depend
# on where the series starts.)
FEATURE_LOOKBACK_DAYS = 64
LABEL_HORIZON_DAYS = 2  # y_t = close[t+2] / close[t+1] - 1
# Which stocks are a day's samples:
#   padded       every stock with a bar (close) that day; suspended days count, windows that
#                reach before a stock's first bar or over missing bars hold zeros (Qlib's way)
#   full-window  the paper's eq. 2: only stocks traded (a close and volume > 0) on all T days of
#                the window, so no window is padded and no suspended day is a sample
UNIVERSE_RULES = ("padded", "full-window")
DEFAULT_SHARD_ROWS = 200_000  # ~20 MB uncompressed with 20 features, ~130 MB with 158: good for streaming
RAW_ROW_GROUP = 65_536
EXCLUDED_LIST_LIMIT = 2_000  # the manifest lists excluded instruments up to this many, else only count + hash
FIT_READ_BYTES = 256 * 1024**2  # the normalisation fit reads as many feature columns at once as fit in this


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    reused: bool
    manifest: dict


def iter_feature_frames(source, feature_set: str, start, end, chunk_size: int = 256, progress: bool = True):
    """Yield raw feature frames (date, instrument, features..., LABEL0) chunk by chunk.

    Bars are read from FEATURE_LOOKBACK_DAYS before `start` (so rolling windows are complete)
    to LABEL_HORIZON_DAYS after `end` (so the label of `end` is known when the data has it);
    the frames hold the rows of [start, end] only.
    """
    calendar = np.asarray(source.calendar, dtype="datetime64[D]")
    i_start = int(np.searchsorted(calendar, np.datetime64(start, "D")))
    i_end = int(np.searchsorted(calendar, np.datetime64(end, "D"), side="right")) - 1
    read_from = calendar[max(0, i_start - FEATURE_LOOKBACK_DAYS)]
    read_to = calendar[min(len(calendar) - 1, i_end + LABEL_HORIZON_DAYS)]
    window_calendar = calendar[(calendar >= read_from) & (calendar <= read_to)]
    n_chunks = -(-len(source.instruments) // chunk_size)
    chunks = source.iter_chunks(instruments_per_chunk=chunk_size, start=read_from, end=read_to)
    for bars in tqdm(chunks, total=n_chunks, desc="features", unit="chunk", disable=not progress):
        if bars.empty:
            continue
        yield features_frame(bars, feature_set=feature_set, calendar=window_calendar,
                             span=(calendar[i_start], calendar[i_end])), bars


def write_feature_table(source, out_path, start, end, feature_set: str = "alpha158_20", progress: bool = True) -> int:
    """`fvae-dist features`: the raw, unprocessed features and label, atomically written."""
    out_path = Path(out_path)
    start, end = _clip_range(source.calendar, start, end, "--start/--end")
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer, n_rows = None, 0
    try:
        for frame, _ in iter_feature_frames(source, feature_set, start, end, progress=progress):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            n_rows += len(frame)
        if writer is None:
            raise DataError(f"{source.name}: no bars between {start} and {end}")
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return n_rows


def prepare_dataset(
    source,
    out_dir,
    *,
    splits: Splits | None = None,
    seq_len: int = 20,
    feature_set: str = "alpha158_20",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    chunk_size: int = 256,
    progress: bool = True,
    fit_exclude_instruments: Iterable[str] = (),
    universe: str = "padded",
) -> PrepareResult:
    """Build the data set in out_dir, or reuse it when its fingerprint (input and settings) matches.

    fit_exclude_instruments: stocks left out of the normalisation fit (not out of the shards).
    universe: which stocks are a day's samples, one of UNIVERSE_RULES."""
    if universe not in UNIVERSE_RULES:
        raise ConfigError(f"--universe {universe!r}: expected one of {', '.join(UNIVERSE_RULES)}")
    if feature_set not in FEATURE_SETS:
        raise ConfigError(f"feature set {feature_set!r} unknown; expected one of {sorted(FEATURE_SETS)}")
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {seq_len}")
    if shard_rows < 1_000:
        raise ConfigError(f"--shard-rows must be >= 1000, got {shard_rows}")
    out_dir = location(out_dir)  # a directory, or a storage URI (built locally, then uploaded)
    requested_splits = splits
    splits = resolve_splits(source.calendar, splits, warmup_days=seq_len)
    excluded = _checked_exclusions(source, fit_exclude_instruments)
    settings = prepare_settings(source.fingerprint(), source_open_args(source), splits.to_json(), seq_len,
                                feature_set, shard_rows, excluded, universe)
    fingerprint = settings_fingerprint(settings)
    existing = existing_manifest(out_dir)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return PrepareResult(out_dir, reused=True, manifest=existing)

    if isinstance(out_dir, UriPath):
        if existing is not None:
            raise DataError(f"{out_dir}: holds a data set prepared from other input or settings; a bucket has no "
                            "atomic rename to replace it safely: delete it first, or use another --out")
        with tempfile.TemporaryDirectory(prefix="fvae-prepare-") as scratch:
            result = prepare_dataset(source, Path(scratch) / "dataset", splits=requested_splits, seq_len=seq_len,
                                     feature_set=feature_set, shard_rows=shard_rows, chunk_size=chunk_size,
                                     progress=progress, fit_exclude_instruments=fit_exclude_instruments,
                                     universe=universe)
            upload_dataset(result.path, out_dir)
        return PrepareResult(out_dir, reused=False, manifest=result.manifest)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    (tmp / "raw").mkdir(parents=True)
    (tmp / "shards").mkdir()
    try:
        manifest = _build(source, tmp, splits, seq_len, feature_set, shard_rows, chunk_size, progress, excluded,
                          universe)
        manifest.update(fingerprint=fingerprint, settings=settings, build={"chunk_size": chunk_size})
        with open(tmp / MANIFEST_NAME, "w") as handle:
            json.dump(manifest, handle, indent=1)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(out_dir, reused=False, manifest=manifest)


def prepare_settings(source_fingerprint: str, source_open: dict | None, splits_json: dict, seq_len: int,
                     feature_set: str, shard_rows: int, fit_excluded: list[str], universe: str = "padded") -> dict:
    """Everything that decides a data set's content; its hash is the prepare fingerprint."""
    settings = {
        "format_version": FORMAT_VERSION,
        "source": source_fingerprint,
        "source_open": source_open,
        "splits": splits_json,
        "seq_len": seq_len,
        "feature_set": feature_set,
        "shard_rows": shard_rows,
        "version": __version__,
    }
    if fit_excluded:  # absent when empty: a plain prepare's fingerprint does not mention the feature
        settings["fit_exclude_instruments"] = {"count": len(fit_excluded), "sha256": instruments_hash(fit_excluded)}
    if universe != "padded":  # likewise: data sets of the default rule keep their fingerprints
        settings["universe"] = universe
    return settings


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def instruments_hash(instruments: Iterable[str]) -> str:
    """Hash of a set of instrument codes (order and duplicates do not matter)."""
    return hashlib.sha256("\n".join(sorted(set(instruments))).encode()).hexdigest()[:16]


def instrument_list(instruments: Iterable[str]) -> list[str]:
    """Sorted, distinct instrument codes; a lone code is one code, not its characters."""
    if isinstance(instruments, str):
        instruments = [instruments]
    return sorted({str(code) for code in instruments})


def _checked_exclusions(source, instruments: Iterable[str]) -> list[str]:
    excluded = instrument_list(instruments)
    unknown = sorted(set(excluded) - set(map(str, source.instruments)))
    if unknown:
        raise ConfigError(f"fit_exclude_instruments: {len(unknown)} code(s) not in {source.name}, e.g. "
                          f"{unknown[:3]}; expected instruments of the source")
    return excluded


def source_open_args(source) -> dict | None:
    """How to reopen `source` (its open_args(), see bars.BarSource), recorded in the manifest so
    that data/reopen.py can rebuild the data set; None for in-memory sources."""
    describe = getattr(source, "open_args", None)
    return describe() if callable(describe) else None


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _build(source, tmp: Path, splits: Splits, seq_len, feature_set, shard_rows, chunk_size, progress,
           fit_excluded: list[str], universe_rule: str = "padded") -> dict:
    features = list(FEATURE_SETS[feature_set])
    calendar = np.asarray(source.calendar, dtype="datetime64[D]")
    first_window_day = calendar[max(0, int(np.searchsorted(calendar, splits.train[0])) - (seq_len - 1))]
    membership = source.membership
    oracle_parts = []

    raw_rows = 0
    for k, (frame, bars) in enumerate(
        iter_feature_frames(source, feature_set, first_window_day, splits.test[1], chunk_size, progress)
    ):
        frame["in_universe"] = _universe_mask(frame, bars, splits, membership)
        if universe_rule == "full-window":
            frame["in_universe"] &= traded_whole_window(frame, bars, calendar, seq_len)
        frame[LABEL_NAME] = _purge_labels_across_splits(frame, splits, calendar)
        frame = frame.sort_values(["date", "instrument"], kind="stable")
        pq.write_table(
            pa.Table.from_pandas(frame, preserve_index=False),
            tmp / "raw" / f"part-{k:05d}.parquet",
            row_group_size=RAW_ROW_GROUP,
            compression="zstd",
        )
        raw_rows += len(frame)
        oracle = _oracle_frame(source, bars, splits)
        if oracle is not None:
            oracle_parts.append(oracle)
    if raw_rows == 0:
        raise DataError(f"{source.name}: no bars between {first_window_day} and {splits.test[1]}")
    raw = ds.dataset(tmp / "raw", format="parquet")
    raw_bytes = _dir_bytes(tmp / "raw")

    stats = _fit_normalisation(raw, features, splits, fit_excluded)
    shards, universe = _write_shards(raw, tmp, features, splits, seq_len, shard_rows, stats, calendar, progress)
    shard_bytes = sum(entry["bytes"] for entry in shards)
    rows_stored = sum(entry["n_rows"] for entry in shards)
    rows_distinct = _distinct_rows(raw, shards)
    if oracle_parts:
        oracle = pd.concat(oracle_parts, ignore_index=True).sort_values(["date", "instrument"])
        pq.write_table(pa.Table.from_pandas(oracle, preserve_index=False), tmp / "oracle.parquet")
    shutil.rmtree(tmp / "raw")

    return {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "features": features,
        "feature_set": feature_set,
        "label": LABEL_NAME,
        "target": "label_norm",
        "seq_len": seq_len,
        "universe_rule": universe_rule,
        "splits": {
            name: {"start": str(start), "end": str(end), **universe[name]}
            for name, (start, end) in splits.items()
        },
        "processors": [
            "RobustZScoreNorm(fit=train, clip=3)",
            "Fillna(0)",
            "DropnaLabel(train)",
            "CSRankNorm(label -> label_norm)",
        ],
        "normalization": {
            **stats.to_json(),
            "fit_start": str(splits.train[0]),
            "fit_end": str(splits.train[1]),
            "fit_excluded_instruments": {
                "count": len(fit_excluded),
                "sha256": instruments_hash(fit_excluded),
                "instruments": fit_excluded if len(fit_excluded) <= EXCLUDED_LIST_LIMIT else None,
            },
        },
        "label_purge": f"labels whose {LABEL_HORIZON_DAYS}-day horizon crosses a split end are dropped (train, valid)",
        "source": {"name": source.name, "fingerprint": source.fingerprint(), "open": source_open_args(source),
                   "membership": "point-in-time" if source.membership is not None else "every stock with data"},
        "oracle": "oracle.parquet" if oracle_parts else None,
        "shards": shards,
        "disk": {
            "shard_bytes": shard_bytes,
            "day_level_feature_table_bytes": raw_bytes,
            "bytes_ratio": round(shard_bytes / max(raw_bytes, 1), 4),
            "rows_stored": rows_stored,
            "rows_distinct": rows_distinct,
            "rows_ratio": round(rows_stored / max(rows_distinct, 1), 4),
        },
    }


def _universe_mask(frame: pd.DataFrame, bars: pd.DataFrame, splits: Splits, membership) -> np.ndarray:
    """Samples of a day: stocks with a real close that day, and members that day if membership is known."""
    dates = frame["date"].to_numpy(dtype="datetime64[D]")
    closes = bars[["date", "instrument", "close"]].copy()
    closes["date"] = closes["date"].to_numpy(dtype="datetime64[D]")
    has_close = (
        frame[["date", "instrument"]]
        .assign(date=dates)
        .merge(closes, on=["date", "instrument"], how="left")["close"]
        .notna()
        .to_numpy()
    )
    in_span = (dates >= splits.train[0]) & (dates <= splits.test[1])
    mask = has_close & in_span
    if membership is not None:
        mask &= member_mask(frame["instrument"].to_numpy(dtype=str), dates, membership)
    return mask


def traded_whole_window(frame: pd.DataFrame, bars: pd.DataFrame, calendar: np.ndarray, seq_len: int) -> np.ndarray:
    """For each (date, instrument) row of `frame`: did the stock trade (a close and volume > 0) on
    every one of the seq_len trading days of `calendar` that end at that date? (eq. 2's universe.)"""
    traded = bars[["date", "instrument"]].copy()
    traded["date"] = traded["date"].to_numpy(dtype="datetime64[D]")
    traded = traded[(bars["close"].notna() & (bars["volume"].fillna(0) > 0)).to_numpy()]
    codes = pd.Index(pd.unique(np.concatenate([frame["instrument"].to_numpy(dtype=str),
                                               traded["instrument"].to_numpy(dtype=str)])))
    span = len(calendar) + seq_len   # keys of different stocks never fall into one window
    def keys(dates, instruments):
        return (codes.get_indexer(np.asarray(instruments, dtype=str)).astype(np.int64) * span
                + np.searchsorted(calendar, np.asarray(dates, dtype="datetime64[D]")))
    traded_keys = np.unique(keys(traded["date"], traded["instrument"]))
    row_keys = keys(frame["date"].to_numpy(dtype="datetime64[D]"), frame["instrument"])
    # traded days in [t - seq_len + 1, t] of the same stock, counted on the sorted traded keys
    count = np.searchsorted(traded_keys, row_keys, side="right") - np.searchsorted(traded_keys, row_keys - seq_len + 1)
    return count == seq_len


def _purge_labels_across_splits(frame: pd.DataFrame, splits: Splits, calendar: np.ndarray) -> np.ndarray:
    """A train (valid) label whose horizon reaches into the next split would leak its prices: drop it."""
    label = frame[LABEL_NAME].to_numpy(dtype=np.float32).copy()
    dates = frame["date"].to_numpy(dtype="datetime64[D]")
    positions = np.searchsorted(calendar, dates)
    horizon_day = calendar[np.minimum(positions + LABEL_HORIZON_DAYS, len(calendar) - 1)]
    for name in ("train", "valid"):
        start, end = splits[name]
        label[(dates >= start) & (dates <= end) & (horizon_day > end)] = np.nan
    return label


def _oracle_frame(source, bars: pd.DataFrame, splits: Splits) -> pd.DataFrame | None:
    """The generator's true expected returns (synthetic sources only), for an oracle Rank IC."""
    if not hasattr(source, "true_expected_returns"):
        return None
    oracle = source.true_expected_returns(bars)
    dates = oracle["date"].to_numpy(dtype="datetime64[D]")
    keep = (dates >= splits.valid[0]) & (dates <= splits.test[1])
    return oracle.loc[keep].reset_index(drop=True)


def _fit_normalisation(raw: ds.Dataset, features: list[str], splits: Splits, excluded: list[str] = ()):
    """RobustZScoreNorm statistics from the training span's universe rows only (no look-ahead),
    without the rows of the `excluded` instruments."""
    train_rows = (
        (ds.field("date") >= pa.scalar(splits.train[0].astype("datetime64[ms]")))
        & (ds.field("date") <= pa.scalar(splits.train[1].astype("datetime64[ms]")))
        & ds.field("in_universe")
    )
    if len(excluded):
        train_rows &= ~ds.field("instrument").isin(pa.array(list(excluded), type=pa.string()))
    n_rows = raw.count_rows(filter=train_rows)
    if n_rows == 0:
        without = f" without the {len(excluded)} excluded instrument(s)" if len(excluded) else ""
        raise DataError(f"--train {splits.train[0]}..{splits.train[1]}: no universe stock-days{without} to fit "
                        "the normalisation on")
    # a few float32 columns of the training rows at a time: memory stays bounded whatever the feature count
    per_read = max(1, FIT_READ_BYTES // (4 * n_rows))
    median, scale = {}, {}
    for first in range(0, len(features), per_read):
        names = features[first: first + per_read]
        table = raw.to_table(columns=names, filter=train_rows)
        fitted = fit_robust_zscore({name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
                                    for name in names})
        del table
        median.update(fitted.median)
        scale.update(fitted.scale)
    return RobustZScore(median=median, scale=scale, clip=fitted.clip)


def _write_shards(raw, tmp, features, splits, seq_len, shard_rows, stats, calendar, progress):
    counts = _universe_rows_per_day(raw)
    plans = []
    universe = {}
    for name, (start, end) in splits.items():
        days = counts[(counts.index >= start) & (counts.index <= end)]
        if days.empty or days.sum() == 0:
            raise DataError(f"--{name} {start}..{end}: no universe stock-days in this range")
        universe[name] = {
            "n_days": int((days > 0).sum()),
            "n_stock_days": int(days.sum()),
            "universe_size": {"mean": round(float(days[days > 0].mean()), 1), "min": int(days[days > 0].min()), "max": int(days.max())},
        }
        for own in _group_days(days, shard_rows):
            plans.append((name, own[0], own[-1]))

    entries = []
    per_split_index: dict[str, int] = {}
    for name, own_start, own_end in tqdm(plans, desc="shards", unit="shard", disable=not progress):
        k = per_split_index.get(name, 0)
        per_split_index[name] = k + 1
        halo_start = calendar[max(0, int(np.searchsorted(calendar, own_start)) - (seq_len - 1))]
        frame = _read_range(raw, halo_start, own_end)
        frame = _shard_frame(frame, features, stats, own_start, own_end)
        path = Path("shards") / f"{name}-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / path, compression="zstd")
        instruments_n = frame.loc[frame["in_universe"], "instrument"].nunique()
        entries.append(
            {
                "path": str(path),
                "split": name,
                "own_start": str(own_start),
                "own_end": str(own_end),
                "halo_start": str(halo_start),
                "n_days": int(frame.loc[frame["in_universe"], "date"].nunique()),
                "n_rows": len(frame),
                "n_instruments": int(instruments_n),
                "bytes": (tmp / path).stat().st_size,
            }
        )
    for name in universe:
        ids = set()
        for entry in entries:
            if entry["split"] == name:
                table = pq.read_table(tmp / entry["path"], columns=["instrument", "in_universe"])
                ids.update(pc.filter(table["instrument"], table["in_universe"]).to_pylist())
        universe[name]["n_instruments"] = len(ids)
    return entries, universe


def _shard_frame(frame: pd.DataFrame, features, stats, own_start, own_end) -> pd.DataFrame:
    dates = frame["date"].to_numpy(dtype="datetime64[D]")
    own = (dates >= own_start) & (dates <= own_end)
    # halo rows are history for windows, never samples of this shard
    frame["in_universe"] = frame["in_universe"].to_numpy() & own
    # keep only stocks that are samples on some own day: their halo rows are the windows' history
    members = frame.loc[frame["in_universe"], "instrument"].unique()
    frame = frame[frame["instrument"].isin(members)].copy()
    frame = apply_robust_zscore(frame, stats)
    label = frame[LABEL_NAME].to_numpy(dtype=np.float32)
    universe_label = np.where(frame["in_universe"].to_numpy(), label, np.nan)
    frame["label_norm"] = cs_rank_norm(universe_label, frame["date"].to_numpy())
    frame = frame.rename(columns={LABEL_NAME: "label"})
    frame = frame.sort_values(["date", "instrument"], kind="stable").reset_index(drop=True)
    return frame[["date", "instrument", *features, "label", "label_norm", "in_universe"]]


def _read_range(raw: ds.Dataset, start, end, columns: list[str] | None = None) -> pd.DataFrame:
    rows = (ds.field("date") >= pa.scalar(np.datetime64(start, "ms"))) & (
        ds.field("date") <= pa.scalar(np.datetime64(end, "ms"))
    )
    return raw.to_table(columns=columns, filter=rows).to_pandas()


def _universe_rows_per_day(raw: ds.Dataset) -> pd.Series:
    table = raw.to_table(columns=["date", "in_universe"], filter=ds.field("in_universe"))
    dates = table.column("date").to_numpy().astype("datetime64[D]")
    unique, counts = np.unique(dates, return_counts=True)
    return pd.Series(counts, index=unique)


def _group_days(days: pd.Series, shard_rows: int) -> Iterator[list]:
    group, rows = [], 0
    for day, n in days.items():
        group.append(np.datetime64(day, "D"))
        rows += int(n)
        if rows >= shard_rows:
            yield group
            group, rows = [], 0
    if group:
        yield group


def _distinct_rows(raw: ds.Dataset, shards: list[dict]) -> int:
    first = min(np.datetime64(entry["halo_start"]) for entry in shards)
    last = max(np.datetime64(entry["own_end"]) for entry in shards)
    return len(_read_range(raw, first, last, columns=["date"])) if shards else 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def existing_manifest(out_dir) -> dict | None:
    """The manifest of the data set in out_dir; None when there is none yet (refuses a non-empty
    folder that is not a data set, so prepare never overwrites someone's files)."""
    path = out_dir / MANIFEST_NAME
    if not out_dir.exists():
        return None
    if not path.is_file():
        if any(True for _ in out_dir.iterdir()):
            raise DataError(f"{out_dir}: exists, is not empty and holds no {MANIFEST_NAME}; refusing to overwrite it")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def upload_dataset(local: Path, target: UriPath) -> None:
    """Copy a finished data set to a storage URI, manifest.json last: readers take a data set
    whose manifest is there as complete, so a copy cut short is never read as one."""
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            upload_file(path, target / path.relative_to(local).as_posix())
    upload_file(local / MANIFEST_NAME, target / MANIFEST_NAME)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished data set into place; an older one is replaced only once the new one is whole."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)


def _clip_range(calendar, start, end, setting: str):
    calendar = np.asarray(calendar, dtype="datetime64[D]")
    start = calendar[0] if start is None else np.datetime64(start, "D")
    end = calendar[-1] if end is None else np.datetime64(end, "D")
    inside = calendar[(calendar >= start) & (calendar <= end)]
    if inside.size == 0:
        raise DataError(
            f"{setting} {start}..{end}: no trading days; the data covers {calendar[0]}..{calendar[-1]}"
        )
    return inside[0], inside[-1]
