"""A minimal in-memory BarSource for pipeline tests (the real readers are tested on their own)."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


class FrameSource:
    def __init__(self, bars: pd.DataFrame, membership: pd.DataFrame | None = None, name: str = "frame"):
        self.bars = bars.sort_values(["instrument", "date"]).reset_index(drop=True)
        self.name = name
        self.calendar = np.unique(self.bars["date"].to_numpy(dtype="datetime64[D]"))
        self.instruments = sorted(self.bars["instrument"].unique())
        self.membership = membership

    def iter_chunks(self, instruments_per_chunk=256, start=None, end=None):
        dates = self.bars["date"].to_numpy(dtype="datetime64[D]")
        keep = np.ones(len(dates), dtype=bool)
        if start is not None:
            keep &= dates >= np.datetime64(start, "D")
        if end is not None:
            keep &= dates <= np.datetime64(end, "D")
        bars = self.bars[keep]
        for i in range(0, len(self.instruments), instruments_per_chunk):
            chunk = self.instruments[i : i + instruments_per_chunk]
            yield bars[bars["instrument"].isin(chunk)].reset_index(drop=True)

    def fingerprint(self) -> str:
        content = pd.util.hash_pandas_object(self.bars, index=False).to_numpy().tobytes()
        return hashlib.sha256(content).hexdigest()[:16]


def random_walk_bars(n_stocks: int = 30, n_days: int = 160, seed: int = 0) -> pd.DataFrame:
    """Log-normal random walks with positive OHLC, volume, a few suspended days and late listings."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2020-01-01", periods=n_days)
    frames = []
    for s in range(n_stocks):
        first = 0 if s % 5 else int(rng.integers(10, n_days // 2))  # every 5th stock lists late
        n = n_days - first
        close = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
        spread = np.abs(rng.normal(0, 0.01, n)) * close
        open_ = close * (1 + rng.normal(0, 0.005, n))
        volume = rng.lognormal(12, 0.5, n)
        volume[rng.random(n) < 0.02] = 0.0  # suspended days
        frames.append(
            pd.DataFrame(
                {
                    "date": dates[first:],
                    "instrument": f"SH{600000 + s}",
                    "open": open_,
                    "high": np.maximum(open_, close) + spread,
                    "low": np.minimum(open_, close) - spread * 0.5,
                    "close": close,
                    "volume": volume,
                    "factor": 1.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
