"""Score or trade predictions on a sub-universe: each day's members of an index (e.g. CSI300).

    restrict_to_members(predictions, membership) -> the rows whose stock was a member that day

The paper trains and scores on all A-shares but builds its portfolios from each day's CSI300
members (Experiment 3); comparing with CSI300-trained runs or Qlib's CSI300 benchmark also needs
the all-A predictions scored on the members alone. Membership is point in time: a stock counts on
the days inside one of its [start_date, end_date] intervals (data/bars.read_membership's table).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fvae_dist.evaluate.metrics import require_columns


def member_mask(instruments: np.ndarray, dates: np.ndarray, membership: pd.DataFrame) -> np.ndarray:
    """For each (instrument, date) row: was the stock a member that day?"""
    require_columns(membership, ["instrument", "start_date", "end_date"], "membership")
    instruments = np.asarray(instruments, dtype=str)
    dates = np.asarray(dates, dtype="datetime64[D]")
    member = np.zeros(len(instruments), dtype=bool)
    spans = membership.assign(instrument=membership["instrument"].astype(str))
    order = np.argsort(instruments, kind="stable")
    sorted_codes = instruments[order]
    for code, rows in spans.groupby("instrument"):
        lo, hi = np.searchsorted(sorted_codes, code, "left"), np.searchsorted(sorted_codes, code, "right")
        if lo == hi:
            continue
        idx = order[lo:hi]
        starts = pd.to_datetime(rows["start_date"]).to_numpy("datetime64[D]")
        ends = pd.to_datetime(rows["end_date"]).to_numpy("datetime64[D]")
        day = dates[idx]
        member[idx] = ((day[:, None] >= starts[None, :]) & (day[:, None] <= ends[None, :])).any(axis=1)
    return member


def restrict_to_members(predictions: pd.DataFrame, membership: pd.DataFrame) -> pd.DataFrame:
    """The prediction rows whose stock was a member on that date (index reset)."""
    require_columns(predictions, ["date", "instrument"], "predictions")
    keep = member_mask(predictions["instrument"].to_numpy(), predictions["date"].to_numpy(), membership)
    return predictions.loc[keep].reset_index(drop=True)
