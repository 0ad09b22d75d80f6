"""Window sums and moments over trailing windows of a [instruments, days] panel.

What Qlib's Mean, Sum, Std, Corr, Slope, Rsquare and Resi see of a window: the count, sums, means
and centred cross sums of its valid values (pandas skips NaN and treats +-inf as NaN; windows use
min_periods=1).

Every window sum is a direct (tree) sum of the window's values obtained by doubling (sums over 1,
2, 4, ... days, combined by the window's binary digits), so no rounding error accumulates over
years of history. Windows whose centred second moment is small next to the raw one (the flat
windows of suspended stocks, above all, where the variance must come out exactly zero) are
recomputed directly from their values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

# A window is recomputed from its values when its centred sum of squares is below this share of its
# raw (instrument-mean-centred) sum of squares; above it, rounding costs < ~1e-7 relative.
_CANCELLATION_LIMIT = 1e-8


def trailing_sums(values: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """Sum of the last w values along axis 1 (nothing before the start), for each w in `windows`.

    Each window's sum adds two shorter spans already summed (Alpha158's 60 = 30 + 30, 30 = 20 + 10,
    20 = 10 + 10, 10 = 5 + 5, 5 = 3 + 2, ...), so every result is a direct (tree) sum of w values, not a
    difference of running sums, and shared spans are summed once.
    """
    spans = {1: values}
    for w in sorted(set(windows)):
        _span_sum(spans, w)
    return {w: spans[w] for w in windows}


def _span_sum(spans: dict[int, np.ndarray], w: int) -> np.ndarray:
    """The sum over w days, from two known spans when there are such, else from halves built first."""
    if w not in spans:
        recent = next((a for a in sorted(spans, reverse=True) if a < w and w - a in spans), None)
        if recent is None:
            recent = w - w // 2
            _span_sum(spans, recent)
            _span_sum(spans, w // 2)
        spans[w] = add_shifted(spans[recent], spans[w - recent], recent)
    return spans[w]


def add_shifted(recent: np.ndarray, earlier: np.ndarray, lag: int) -> np.ndarray:
    """recent[:, t] + earlier[:, t - lag], where day t - lag exists; a new array."""
    out = np.empty_like(recent)
    lag = min(lag, recent.shape[1])
    out[:, :lag] = recent[:, :lag]
    np.add(recent[:, lag:], earlier[:, : recent.shape[1] - lag], out=out[:, lag:])
    return out


@dataclass
class Moments:
    """Statistics of the jointly valid values of each trailing window, arrays [instruments, days].

    Variables are the data series in order, preceded, for a regression on time, by the position in
    the window (0 on the window's last day, -1 the day before, ...).
    """

    n: np.ndarray
    mean: list[np.ndarray]
    cross: dict[tuple[int, int], np.ndarray]  # sum over the window of (a - mean_a) * (b - mean_b)
    _std: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def std(self, a: int) -> np.ndarray:
        """Sample std (ddof=1) of variable a; NaN with fewer than two values, as pandas."""
        if a not in self._std:
            var = np.maximum(self.cross[(a, a)], 0.0) / (self.n - 1)
            self._std[a] = np.where(self.n >= 2, np.sqrt(var), np.nan)
        return self._std[a]

    def corr(self, a: int, b: int) -> np.ndarray:
        r = self.cross[(a, b)] / np.sqrt(self.cross[(a, a)] * self.cross[(b, b)])
        return np.where(self.n >= 2, r, np.nan)

    def slope(self, a: int, b: int) -> np.ndarray:
        """Least-squares slope of variable b on variable a."""
        return np.where(self.n >= 2, self.cross[(a, b)] / self.cross[(a, a)], np.nan)


def window_moments(series: Sequence[np.ndarray], on_time: bool, windows: Sequence[int]) -> dict[int, Moments]:
    """Count, means and centred cross sums of the jointly valid values of `series` over each window."""
    series = [np.asarray(s, dtype=np.float64) for s in series]
    n_days = series[0].shape[1]
    valid = np.logical_and.reduce([np.isfinite(s) for s in series])
    count = valid.astype(np.float64)
    variables, anchors = [], []
    for s in series:
        # centring on the instrument's mean keeps squares near the scale of the variation
        total = np.where(valid, s, 0.0).sum(axis=1)
        n_valid = count.sum(axis=1)
        anchor = np.divide(total, n_valid, out=np.zeros_like(total), where=n_valid > 0)
        variables.append(np.where(valid, s - anchor[:, None], 0.0))
        anchors.append(anchor)
    position = np.arange(n_days, dtype=np.float64) - n_days // 2
    if on_time:
        variables.insert(0, count * position)
    pairs = [(a, b) for a in range(len(variables)) for b in range(a, len(variables))]

    n = trailing_sums(count, windows)
    sums = [trailing_sums(v, windows) for v in variables]
    raw = {}
    for a, b in pairs:
        product = variables[a] * (position if on_time and a == b == 0 else variables[b])
        raw[(a, b)] = trailing_sums(product, windows)
        del product

    first_data = 1 if on_time else 0
    runs = [_equal_run_length(s, valid) for s in series]
    result = {}
    for w in windows:
        means = [s[w] / n[w] for s in sums]
        cross = {(a, b): raw[(a, b)][w] - sums[a][w] * means[b] for a, b in pairs}
        if on_time:
            means[0] = means[0] - position          # relative to the window's last day
        for i, anchor in enumerate(anchors):
            means[first_data + i] += anchor[:, None]
        suspect = np.zeros(valid.shape, dtype=bool)
        for i, run in enumerate(runs):
            a = first_data + i
            # a full window of one repeated value (a suspended stock): exactly flat, no recomputing
            flat = run >= w
            suspect |= (cross[(a, a)] <= _CANCELLATION_LIMIT * raw[(a, a)][w]) & ~flat
            means[a][flat] = series[i][flat]
            for pair, values in cross.items():
                if a in pair:
                    values[flat] = 0.0
        suspect &= n[w] >= 1
        moments = Moments(n=n[w], mean=means, cross=cross)
        insts, days = np.nonzero(suspect)
        if len(insts):
            _recompute_windows(moments, series, on_time, w, insts, days)
        result[w] = moments
    return result


def _equal_run_length(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Number of consecutive valid days, ending on each day, holding that day's value (0 where invalid)."""
    n_days = values.shape[1]
    same = np.zeros(values.shape, dtype=bool)
    same[:, 1:] = valid[:, 1:] & valid[:, :-1] & (values[:, 1:] == values[:, :-1])
    day = np.arange(n_days)
    run_start = np.maximum.accumulate(np.where(same, 0, day), axis=1)
    return np.where(valid, day - run_start + 1, 0)


def _recompute_windows(moments: Moments, series, on_time: bool, window: int, insts, days) -> None:
    """Two-pass statistics of the given windows from their values; a window of equal values is exactly flat."""
    offsets = np.arange(-window + 1, 1)
    take = days[:, None] + offsets                                   # [k, window]
    inside = take >= 0
    take = np.maximum(take, 0)
    values = [np.where(inside, s[insts[:, None], take].astype(np.float64), np.nan) for s in series]
    valid = inside & np.logical_and.reduce([np.isfinite(v) for v in values])
    n = valid.sum(axis=1).astype(np.float64)
    if on_time:
        values.insert(0, np.broadcast_to(offsets.astype(np.float64), take.shape))
    deviations = []
    for i, v in enumerate(values):
        mean = np.where(valid, v, 0.0).sum(axis=1) / n
        high = np.where(valid, v, -np.inf).max(axis=1)
        low = np.where(valid, v, np.inf).min(axis=1)
        flat = high == low
        mean = np.where(flat, high, mean)
        deviations.append(np.where(valid & ~flat[:, None], v - mean[:, None], 0.0))
        moments.mean[i][insts, days] = mean
    moments.n[insts, days] = n
    for (a, b), cross in moments.cross.items():
        cross[insts, days] = (deviations[a] * deviations[b]).sum(axis=1)


def pandas_std_of_zero_windows(values: np.ndarray, std: np.ndarray, zero_window: np.ndarray, window: int) -> np.ndarray:
    """Qlib's Std is pandas' rolling std, which (pandas >= 3) on a window of zeros can return the leftover
    of its running Welford sums instead of 0; VSTD/WVMA then divide it by 1e-12. Ask pandas for those windows."""
    rows = np.flatnonzero(zero_window.any(axis=1))
    if rows.size == 0:
        return std
    theirs = pd.DataFrame(values[rows].T.astype(np.float64)).rolling(window, min_periods=1).std().to_numpy().T
    std = std.copy()
    std[rows] = np.where(zero_window[rows], theirs, std[rows])
    return std



def rolling_sums(values: np.ndarray, windows: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(sum, count) of each trailing window's valid values, float64: Qlib's Sum is the sum (NaN where
    the window holds no valid value, as pandas with min_periods=1), its Mean the sum over the count."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(values)
    sums = trailing_sums(np.where(valid, values, 0.0), windows)
    counts = trailing_sums(valid.astype(np.float64), windows)
    return {w: (np.where(counts[w] > 0, sums[w], np.nan), counts[w]) for w in windows}
