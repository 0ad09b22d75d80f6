"""Day-panel blocks: how a shard's days travel through Ray Data without their [N, T, C] windows.

A window tensor repeats every stock-day T times (the day of T windows), so rows that carried
windows would hold T times the day-level feature table. A block instead carries runs of
consecutive days with the day-level features they need, once; the consumer cuts the windows.

    shard_blocks(shard, seq_len, G, drop_nan_label) -> block dicts   (driver side, a read task)
    days_in_block(block) -> [DaySample]                               (consumer side)

A block is the days of ONE shard that have a sample (iter_shard_days' days), at most G
(data.days_per_block) consecutive ones; a shard's n such days are cut into ceil(n / G) runs as
equal as possible, so blocks hold G or a few fewer days. One block, with G' its days, N_b the
stocks that are a sample on at least one of them, P the trading days its windows span and C the
features:

    dates         [G'] int64          the days, days since 1970-01-01, increasing
    instruments   [N_b] str           sorted
    panel         [N_b, P, C] float32 the day-level features of those stocks from the (T-1)-th
                                      trading day before dates[0] through dates[-1]; 0 where a
                                      stock has no row that day and for days before the split's
                                      first (the left padding of a short history), as in
                                      iter_shard_days' cube
    window_start  [G'] int32          day j's window is panel[:, window_start[j] : window_start[j] + T];
                                      window_start[j] + T - 1 is day j's own row, so a window never
                                      reaches a later day. j while no day without a sample lies
                                      between (P = G' + T - 1)
    sample        [G', N_b] bool      which stocks are day j's samples
    y             [G', N_b] float32   CSRankNorm target (NaN where missing or no sample)
    label         [G', N_b] float32   raw LABEL0 (NaN where missing or no sample)
    seq_len       int64               T

Stock-major panel: day j's x is one gather, panel[stocks, a : a + T], already [N, T, C].
Memory: about (G + T - 1) / G times the day-level table of the days' stocks (3.4x at G=8,
T=20); days_in_block gives exactly iter_shard_days' DaySamples (tests/train/test_day_blocks.py).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from fvae_dist.data.shards import DaySample, ShardCube

UNIX_DAY = np.datetime64("1970-01-01", "D")


def shard_blocks(shard: ShardCube, *, seq_len: int, days_per_block: int, drop_nan_label: bool) -> Iterator[dict]:
    """The shard's sample days in blocks of at most `days_per_block` consecutive days."""
    if days_per_block < 1:
        raise ValueError(f"days_per_block must be >= 1, got {days_per_block}")
    days, rows_of_day = [], []
    for day in np.flatnonzero(shard.own):
        rows = shard.sample_rows(day, drop_nan_label)
        if rows.size:  # a day without a sample is no training or evaluation day
            days.append(int(day))
            rows_of_day.append(rows)
    if not days:
        return
    for part in np.array_split(np.arange(len(days)), math.ceil(len(days) / days_per_block)):
        yield _block(shard, [days[i] for i in part], [rows_of_day[i] for i in part], seq_len)


def _block(shard: ShardCube, days: list[int], rows_of_day: list[np.ndarray], seq_len: int) -> dict:
    stocks = np.unique(np.concatenate([shard.row_instrument[rows] for rows in rows_of_day]))  # [N_b]
    first, last = days[0] - seq_len + 1, days[-1]  # shard day indices the panel spans; first may be < 0
    panel = np.zeros((len(stocks), last - first + 1, shard.cube.shape[2]), dtype=np.float32)  # [N_b, P, C]
    start = max(first, 0)
    panel[:, start - first :] = shard.cube[start : last + 1, stocks].transpose(1, 0, 2)
    sample = np.zeros((len(days), len(stocks)), dtype=bool)
    y = np.full((len(days), len(stocks)), np.nan, dtype=np.float32)
    label = np.full((len(days), len(stocks)), np.nan, dtype=np.float32)
    for j, rows in enumerate(rows_of_day):
        columns = np.searchsorted(stocks, shard.row_instrument[rows])
        sample[j, columns] = True
        y[j, columns] = shard.y[rows]
        label[j, columns] = shard.label[rows]
    return {
        "dates": (shard.dates[days] - UNIX_DAY).astype(np.int64),
        "instruments": shard.instruments[stocks].tolist(),
        "panel": panel,
        "window_start": (np.asarray(days) - days[0]).astype(np.int32),
        "sample": sample,
        "y": y,
        "label": label,
        "seq_len": np.int64(seq_len),
    }


def days_in_block(block: dict) -> list[DaySample]:
    """One block (a dict as shard_blocks makes it, or one row of a Ray Data batch) cut into its
    days, in date order."""
    panel = np.asarray(block["panel"])
    seq_len = int(block["seq_len"])
    instruments = np.asarray(block["instruments"], dtype=str)
    sample, y, label = np.asarray(block["sample"]), np.asarray(block["y"]), np.asarray(block["label"])
    days = []
    for j, (date, start) in enumerate(zip(np.asarray(block["dates"]), np.asarray(block["window_start"]))):
        stocks = np.flatnonzero(sample[j])
        days.append(DaySample(
            date=UNIX_DAY + np.timedelta64(int(date), "D"),
            instruments=instruments[stocks],
            x=panel[stocks, start : start + seq_len],  # [N, T, C], a copy
            y=y[j, stocks],
            label=label[j, stocks],
        ))
    return days
