"""Signal metrics: daily IC / Rank IC and their information ratios, Qlib's way.

Per trading day, over the stocks whose score and label are both finite:
  IC      = Pearson correlation(score, label)
  Rank IC = Spearman correlation = Pearson correlation of the average-tie ranks
A day with fewer than 2 such stocks, or with a constant score or label, has no defined
correlation: it is skipped (NaN in the daily table) and counted in `n_skipped_days`.

Summary (as Qlib's SigAnaRecord): IC = mean of the daily ICs, ICIR = mean / std, where std is
pandas' default sample standard deviation (ddof=1); the same for Rank IC. ICIR is not annualised.

The realised label, when the predictions lack it, is Qlib's LABEL0 on the adjusted close:
y_t = close[t+2] / close[t+1] - 1, shifted along the trading calendar of the bars.
"""

from __future__ import annotations

import io

import math

import numpy as np
import pandas as pd

from fvae_dist.errors import DataError

DAILY_IC_COLUMNS = ["date", "ic", "rank_ic", "n"]


def require_columns(frame: pd.DataFrame, columns, where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {list(frame.columns)}")


def _daily_pearson(frame: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Pearson correlation of x and y within each date, all days at once (no per-day Python loop)."""
    grouped = frame.groupby("date", sort=True)
    dx = frame[x] - grouped[x].transform("mean")
    dy = frame[y] - grouped[y].transform("mean")
    parts = pd.DataFrame({"date": frame["date"], "xy": dx * dy, "xx": dx * dx, "yy": dy * dy})
    sums = parts.groupby("date", sort=True)[["xy", "xx", "yy"]].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = sums["xy"] / np.sqrt(sums["xx"] * sums["yy"])
    # Rounding can push |corr| a hair past 1 when the two vectors are (anti)proportional.
    return corr.clip(-1.0, 1.0)


def daily_ic(frame: pd.DataFrame, score: str = "mu", label: str = "label") -> pd.DataFrame:
    """One row per date in `frame`: Pearson IC, Spearman Rank IC and the number of stocks used.

    ic and rank_ic are NaN on skipped days (< 2 finite pairs, or constant score or label).
    """
    require_columns(frame, ["date", "instrument", score, label], "daily_ic input")
    all_dates = pd.Index(pd.to_datetime(frame["date"]).unique()).sort_values()
    used = pd.DataFrame(
        {
            "date": pd.to_datetime(frame["date"]),
            "x": pd.to_numeric(frame[score], errors="coerce").astype("float64"),
            "y": pd.to_numeric(frame[label], errors="coerce").astype("float64"),
        }
    )
    used = used[np.isfinite(used["x"]) & np.isfinite(used["y"])]

    grouped = used.groupby("date", sort=True)
    n = grouped.size()
    # max == min is the exact constancy test; a variance test would let float noise through.
    constant = (grouped["x"].max() == grouped["x"].min()) | (grouped["y"].max() == grouped["y"].min())
    valid_dates = n.index[(n >= 2) & ~constant]
    used = used[used["date"].isin(valid_dates)].copy()

    ic = _daily_pearson(used, "x", "y")
    used["rx"] = used.groupby("date")["x"].rank(method="average")
    used["ry"] = used.groupby("date")["y"].rank(method="average")
    rank_ic = _daily_pearson(used, "rx", "ry")

    out = pd.DataFrame(index=all_dates)
    out.index.name = "date"
    out["ic"] = ic.reindex(all_dates)
    out["rank_ic"] = rank_ic.reindex(all_dates)
    out["n"] = n.reindex(all_dates).fillna(0).astype("int64")
    return out.reset_index()[DAILY_IC_COLUMNS]


def _ratio(series: pd.Series) -> float:
    values = series.dropna()
    if len(values) < 2:
        return math.nan
    std = values.std(ddof=1)
    return float(values.mean() / std) if std > 0 else math.nan


def summarize_ic(daily: pd.DataFrame) -> dict:
    """Mean IC / Rank IC over the valid days and their ratios to the daily std (ddof=1, as Qlib)."""
    require_columns(daily, DAILY_IC_COLUMNS, "summarize_ic input")
    valid = daily["rank_ic"].notna() & daily["ic"].notna()
    return {
        "ic": float(daily.loc[valid, "ic"].mean()) if valid.any() else math.nan,
        "icir": _ratio(daily.loc[valid, "ic"]),
        "rank_ic": float(daily.loc[valid, "rank_ic"].mean()) if valid.any() else math.nan,
        "rank_icir": _ratio(daily.loc[valid, "rank_ic"]),
        "n_days": int(valid.sum()),
        "n_skipped_days": int((~valid).sum()),
    }


def realised_label(bars: pd.DataFrame) -> pd.DataFrame:
    """Qlib's LABEL0 from long bars: date, instrument, label = close[t+2] / close[t+1] - 1.

    The shift runs along the bars' trading calendar (all dates present in `bars`), so a stock
    without a bar on t+1 or t+2 gets NaN, as Qlib's Ref($close, -k) does.
    """
    require_columns(bars, ["date", "instrument", "close"], "bars")
    close = bars.pivot_table(index="date", columns="instrument", values="close", aggfunc="first")
    close = close.sort_index().astype("float64")
    label = close.shift(-2) / close.shift(-1) - 1.0
    long = label.reset_index().melt(id_vars="date", var_name="instrument", value_name="label")
    long["date"] = pd.to_datetime(long["date"])
    return long.dropna(subset=["label"]).reset_index(drop=True)


def read_predictions(path) -> pd.DataFrame:
    """A predictions file (.parquet or .csv): date, instrument, mu, sigma[, label]; dates normalised."""
    from fvae_dist.storage import location, read_parquet

    path = location(path)  # a local file or a run folder's on a storage URI
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    frame = pd.read_csv(io.BytesIO(path.read_bytes())) if path.name.endswith(".csv") else read_parquet(path)
    require_columns(frame, ["date", "instrument", "mu"], f"predictions {path}")
    frame["date"] = pd.to_datetime(frame["date"]).dt.normalize().astype("datetime64[ns]")
    frame["instrument"] = frame["instrument"].astype(str)
    return frame
