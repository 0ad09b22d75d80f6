"""Order statistics over trailing windows of a [instruments, days] panel: Qlib's Max, Min, IdxMax,
IdxMin, Quantile and Rank, each as pandas computes it for Qlib (rolling(N, min_periods=1)).

A window ends on its day and reaches back N days, never before the instrument's first day (Qlib
stores an instrument from its first bar, so a window near the start is shorter). Days before the
first day are NaN in the panel; "valid" values are the finite ones.

- Max/Min: of the valid values; NaN when there is none (pandas rolling max/min).
- IdxMax/IdxMin: Qlib applies numpy's argmax/argmin to the raw window and adds 1, so the result is
  the 1-based position, counted from the window's first day, of the first occurrence of the extreme,
  and a NaN inside the window wins (numpy's argmax/argmin return the first NaN). NaN when the window
  holds no valid value at all (pandas skips the call under min_periods).
- Quantile: pandas' linear interpolation between the order statistics of the valid values.
- Rank: pandas' rolling rank(pct=True), method "average": the day's value's average rank among
  the window's valid values, over their count; NaN when the day's value is NaN.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fvae_dist.data.alpha158.moments import trailing_sums


def _by_doubling(values, windows: Sequence[int], combine: Callable) -> dict[int, object]:
    """Combine each trailing window from two overlapping power-of-two spans.

    `values` is an array or a tuple of arrays (days on axis 1); combine(recent, earlier) merges a span
    ending on day t with the span ending `lag` days earlier and must be idempotent on overlaps (max,
    min, first argmax). Spans are cut at the first day, like the windows."""
    levels = {1: values}
    span = 1
    while 2 * span <= max(windows):
        levels[2 * span] = _shifted_combine(levels[span], levels[span], span, combine)
        span *= 2
    out = {}
    for w in windows:
        piece = 1 << (w.bit_length() - 1)   # the largest power of two <= w: two such spans cover w days
        out[w] = levels[piece] if piece == w else _shifted_combine(levels[piece], levels[piece], w - piece, combine)
    return out


def _shifted_combine(recent, earlier, lag: int, combine: Callable):
    """combine(recent[:, t], earlier[:, t - lag]) where day t - lag exists, recent[:, t] before that."""
    arrays = isinstance(recent, tuple)
    recent_t = recent if arrays else (recent,)
    earlier_t = earlier if arrays else (earlier,)
    n_days = recent_t[0].shape[1]
    lag = min(lag, n_days)
    merged = combine(tuple(r[:, lag:] for r in recent_t), tuple(e[:, : n_days - lag] for e in earlier_t))
    out = []
    for r, m in zip(recent_t, merged):
        full = np.empty_like(r)
        full[:, :lag] = r[:, :lag]
        full[:, lag:] = m
        out.append(full)
    return tuple(out) if arrays else out[0]


def valid_counts(values: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """Number of valid values in each trailing window."""
    return trailing_sums(np.isfinite(values).astype(np.float64), windows)


def rolling_extreme(values: np.ndarray, windows: Sequence[int], largest: bool) -> dict[int, np.ndarray]:
    """Max (largest=True) or min of each trailing window's valid values, float64; NaN when none."""
    pick = np.fmax if largest else np.fmin        # ignores NaN, NaN only when both are
    combined = _by_doubling(np.asarray(values, dtype=np.float64), windows,
                            lambda recent, earlier: (pick(recent[0], earlier[0]),))
    return combined


def rolling_extreme_position(values: np.ndarray, first_day: np.ndarray, windows: Sequence[int],
                             largest: bool) -> dict[int, np.ndarray]:
    """IdxMax (largest=True) or IdxMin: see the module docstring. first_day: each instrument's first
    day (index on axis 1); the window starts there at the earliest."""
    values = np.asarray(values, dtype=np.float64)
    n_days = values.shape[1]
    day = np.arange(n_days)
    # one ordering key for both: larger wins, a NaN beats every number, days before the instrument's
    # first day never win
    key = np.where(np.isnan(values), np.inf, values if largest else -values)
    key = np.where(day[None, :] < first_day[:, None], -np.inf, key)
    position = np.broadcast_to(day, values.shape).astype(np.int32)

    def first_extreme(recent, earlier):
        # `earlier` covers earlier days: on a tie its position is the first occurrence
        take_earlier = earlier[0] >= recent[0]
        return np.where(take_earlier, earlier[0], recent[0]), np.where(take_earlier, earlier[1], recent[1])

    winners = _by_doubling((key, position), windows, first_extreme)
    counts = valid_counts(values, windows)
    out = {}
    for w in windows:
        window_start = np.maximum(day[None, :] - (w - 1), first_day[:, None])
        found = (winners[w][1] - window_start + 1).astype(np.float64)
        out[w] = np.where(counts[w] > 0, found, np.nan)
    return out


def rolling_quantiles(values: np.ndarray, windows: Sequence[int], levels: Sequence[float]) -> dict[int, dict[float, np.ndarray]]:
    """pandas rolling quantile (interpolation "linear") of each trailing window's valid values, for
    each level in `levels`, float64; NaN when the window holds no valid value."""
    values = np.asarray(values, dtype=np.float32)
    n_inst, n_days = values.shape
    counts = valid_counts(values, windows)
    out = {}
    for w in windows:
        padded = np.concatenate([np.full((n_inst, w - 1), np.nan, dtype=values.dtype), values], axis=1)
        ordered = np.ascontiguousarray(sliding_window_view(padded, w, axis=1))
        ordered.sort(axis=-1)                          # NaN sort last
        n = counts[w]
        full = n == w
        partial = np.nonzero(~full & (n > 0))          # windows with fewer valid values: their own positions
        out[w] = {}
        for q in levels:
            # a full window's order statistics sit at the same places in every window
            exact = q * (w - 1)
            low = int(np.floor(exact))
            value = _interpolated(ordered[..., low], ordered[..., min(low + 1, w - 1)], exact - low)
            value = np.where(full, value, np.nan)
            if len(partial[0]):
                exact = q * (n[partial] - 1)
                low = np.floor(exact).astype(np.intp)
                rows = ordered[partial]
                at = np.arange(len(rows))
                value[partial] = _interpolated(rows[at, low], rows[at, np.minimum(low + 1, w - 1)], exact - low)
            out[w][q] = value
    return out


def _interpolated(v_low: np.ndarray, v_high: np.ndarray, fraction) -> np.ndarray:
    """pandas' linear interpolation, float64: idx_with_fraction = quantile * (nobs - 1), the lower order
    statistic alone where that is whole, else lower + (higher - lower) * fraction."""
    v_low, v_high = v_low.astype(np.float64), v_high.astype(np.float64)
    return np.where(fraction == 0, v_low, v_low + (v_high - v_low) * fraction)


def rolling_rank(values: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """pandas rolling rank(pct=True) of each day's value in its trailing window, float64."""
    values = np.asarray(values, dtype=np.float64)
    n_days = values.shape[1]
    less = np.zeros(values.shape, dtype=np.int16)
    equal = np.zeros(values.shape, dtype=np.int16)
    count = np.zeros(values.shape, dtype=np.int16)
    valid = np.isfinite(values)
    wanted = set(windows)
    out = {}
    for lag in range(max(windows)):
        if lag < n_days:
            today, earlier = values[:, lag:], values[:, : n_days - lag]
            less[:, lag:] += earlier < today
            equal[:, lag:] += earlier == today
            count[:, lag:] += valid[:, : n_days - lag]
        w = lag + 1
        if w in wanted:
            # average of the ranks less+1 .. less+equal that the ties share
            rank = (less + (equal + 1) / 2) / count
            out[w] = np.where(valid, rank, np.nan)
    return out
