"""Qlib's Alpha158 time-series features and LABEL0, as vectorised numpy over a [days, instruments] panel.

Every feature reproduces what `qlib.data.D.features` (pyqlib 0.9.7) returns for the expression noted
beside it, quirks included:

- element-wise arithmetic runs in float32, as Qlib's binary store is float32 and numpy keeps that
  dtype (it matters: ``Log($volume+1)`` in float32 is only good to ~1e-6);
- rolling operators use min_periods=1 over the valid values of the window (pandas skips NaN and
  treats +-inf as NaN); Std is the sample standard deviation (ddof=1);
- Rsquare/Resi fit a least-squares line of the value on its position in the window, over the
  window's valid values; Rsquare and Corr are NaN where an input's own rolling std is <= 2e-5;
- Ref(x, k) shifts by k rows of the instrument's own series (negative k looks ahead);
- an instrument exists from its first to its last bar; days in between without a bar are NaN rows,
  days outside that span are not rows at all;
- on a window of zeros (a suspension) pandas' rolling std can return the leftover of its running
  sums instead of 0, which VSTD/WVMA divide by 1e-12; those few windows are handed to pandas itself,
  so they follow the installed pandas (and, like Qlib's, depend on where the series starts).

Rolling statistics are built from window sums, each a direct (tree) sum of the window's values
obtained by doubling (sums over 1, 2, 4, ... days, combined by the window's binary digits), so no
rounding error accumulates over years of history. Windows whose centred second moment is small
next to the raw one (the flat windows of suspended stocks, above all, where the variance must come
out exactly zero) are recomputed directly from their values.

Internally everything is instrument-major, [instruments, days], so time runs along contiguous memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from fvae_dist.errors import ConfigError, DataError

ALPHA158_20: tuple[str, ...] = (
    "KLEN", "KLOW", "ROC60", "STD5",
    "RSQR5", "RSQR10", "RSQR20", "RSQR60",
    "RESI5", "RESI10",
    "CORR5", "CORR10", "CORR20", "CORR60",
    "CORD5", "CORD10", "CORD60",
    "VSTD5", "WVMA5", "WVMA60",
)
LABEL_NAME = "LABEL0"
FEATURE_SETS: dict[str, tuple[str, ...]] = {"alpha158_20": ALPHA158_20}

BAR_COLUMNS = ("date", "instrument", "open", "high", "low", "close", "volume")
PRICE_FIELDS = ("open", "high", "low", "close", "volume")

# Qlib (ops.py, Rsquare and Corr): a window whose rolling std is within 2e-5 of zero gives NaN.
_FLAT_STD = 2e-5
# A window is recomputed from its values when its centred sum of squares is below this share of its
# raw (instrument-mean-centred) sum of squares; above it, rounding costs < ~1e-7 relative.
_CANCELLATION_LIMIT = 1e-8
# Instruments per internal chunk: keeps the working set of temporaries small and reused.
_CHUNK = 32


@dataclass(frozen=True)
class PricePanel:
    """Bars aligned on a trading calendar; arrays are [n_days, n_instruments] float64, NaN where no bar."""

    dates: np.ndarray        # datetime64[D], the calendar rows
    instruments: np.ndarray  # str
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray


# --------------------------------------------------------------------------- panel construction

def panel_from_bars(bars: pd.DataFrame, calendar: np.ndarray | None = None) -> PricePanel:
    """Pivot a long frame of bars onto `calendar` (default: the union of the bars' dates)."""
    return _pivot(bars, _BarLocations.of(bars, calendar))


def _pivot(bars: pd.DataFrame, located: "_BarLocations") -> PricePanel:
    shape = (len(located.calendar), len(located.instruments))
    fields = {}
    for name in PRICE_FIELDS:
        grid = np.full(shape, np.nan)
        grid[located.rows, located.cols] = pd.to_numeric(bars[name], errors="raise").to_numpy(dtype=np.float64)
        fields[name] = grid
    return PricePanel(dates=located.calendar, instruments=located.instruments, **fields)


@dataclass(frozen=True)
class _BarLocations:
    """Calendar row and instrument column of every bar of a long frame."""

    calendar: np.ndarray     # datetime64[D]
    instruments: np.ndarray  # str, sorted
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, bars: pd.DataFrame, calendar: np.ndarray | None) -> "_BarLocations":
        missing = [c for c in BAR_COLUMNS if c not in bars.columns]
        if missing:
            raise DataError(f"bars frame lacks column(s) {missing}; expected at least {list(BAR_COLUMNS)}")
        days = pd.to_datetime(bars["date"]).to_numpy().astype("datetime64[D]")
        if calendar is None:
            cal = np.unique(days)
        else:
            cal = pd.to_datetime(np.asarray(calendar)).to_numpy().astype("datetime64[D]")
            if cal.ndim != 1 or (np.diff(cal) <= np.timedelta64(0, "D")).any():
                raise DataError("calendar must be a 1-D sequence of strictly increasing dates")
        rows = np.searchsorted(cal, days)
        on_calendar = rows < len(cal)
        on_calendar[on_calendar] = cal[rows[on_calendar]] == days[on_calendar]
        if not on_calendar.all():
            first = int(np.flatnonzero(~on_calendar)[0])
            raise DataError(
                f"bars column 'date': {int((~on_calendar).sum())} bar(s) fall on days missing from the "
                f"calendar, first {days[first]} ({bars['instrument'].iloc[first]})"
            )
        codes, names = pd.factorize(bars["instrument"].astype(str), sort=True)
        instruments = np.asarray(names, dtype=str)
        seen = np.bincount(rows * len(instruments) + codes, minlength=len(cal) * len(instruments))
        if (seen > 1).any():
            cell = int(np.flatnonzero(seen > 1)[0])
            raise DataError(
                f"bars hold {int(seen[cell])} rows for ({cal[cell // len(instruments)]}, "
                f"{instruments[cell % len(instruments)]}); expected one per (date, instrument)"
            )
        return cls(calendar=cal, instruments=instruments, rows=rows, cols=codes)

    def life(self) -> tuple[np.ndarray, np.ndarray]:
        """First and last calendar row of each instrument's bars: the span Qlib stores for it."""
        first = np.full(len(self.instruments), len(self.calendar))
        last = np.full(len(self.instruments), -1)
        np.minimum.at(first, self.cols, self.rows)
        np.maximum.at(last, self.cols, self.rows)
        return first, last


# --------------------------------------------------------------------------- window sums and moments

def _trailing_sums(values: np.ndarray, windows: Sequence[int]) -> dict[int, np.ndarray]:
    """Sum of the last w values along axis 1 (nothing before the start), for each w in `windows`.

    Sums over 1, 2, 4, ... days come from doubling, and a window of w days adds the pieces that its
    binary digits name; every result is thus a direct sum of w values, not a difference of running sums.
    """
    levels = {1: values}
    span = 1
    while 2 * span <= max(windows):
        levels[2 * span] = _add_shifted(levels[span], levels[span], span)
        span *= 2
    sums = {}
    for w in windows:
        pieces = [1 << b for b in reversed(range(w.bit_length())) if w >> b & 1]
        total = levels[pieces[0]]
        offset = pieces[0]
        for piece in pieces[1:]:
            total = _add_shifted(total, levels[piece], offset)
            offset += piece
        sums[w] = total
    return sums


def _add_shifted(recent: np.ndarray, earlier: np.ndarray, lag: int) -> np.ndarray:
    """recent[:, t] + earlier[:, t - lag], where day t - lag exists; a new array."""
    out = np.empty_like(recent)
    lag = min(lag, recent.shape[1])
    out[:, :lag] = recent[:, :lag]
    np.add(recent[:, lag:], earlier[:, : recent.shape[1] - lag], out=out[:, lag:])
    return out


@dataclass
class _Moments:
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


def _window_moments(series: Sequence[np.ndarray], on_time: bool, windows: Sequence[int]) -> dict[int, _Moments]:
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

    n = _trailing_sums(count, windows)
    sums = [_trailing_sums(v, windows) for v in variables]
    raw = {}
    for a, b in pairs:
        product = variables[a] * (position if on_time and a == b == 0 else variables[b])
        raw[(a, b)] = _trailing_sums(product, windows)
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
        moments = _Moments(n=n[w], mean=means, cross=cross)
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


def _recompute_windows(moments: _Moments, series, on_time: bool, window: int, insts, days) -> None:
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


def _pandas_std_of_zero_windows(values: np.ndarray, std: np.ndarray, zero_window: np.ndarray, window: int) -> np.ndarray:
    """Qlib's Std is pandas' rolling std, which (pandas >= 3) on a window of zeros can return the leftover
    of its running Welford sums instead of 0; VSTD/WVMA then divide it by 1e-12. Ask pandas for those windows."""
    rows = np.flatnonzero(zero_window.any(axis=1))
    if rows.size == 0:
        return std
    theirs = pd.DataFrame(values[rows].T.astype(np.float64)).rolling(window, min_periods=1).std().to_numpy().T
    std = std.copy()
    std[rows] = np.where(zero_window[rows], theirs, std[rows])
    return std


# --------------------------------------------------------------------------- series the features share

def _ref(values: np.ndarray, periods: int) -> np.ndarray:
    """Qlib's Ref along the day axis: day t gets day t - periods (NaN where that day does not exist)."""
    out = np.full_like(values, np.nan)
    if periods > 0:
        out[:, periods:] = values[:, :-periods]
    elif periods < 0:
        out[:, :periods] = values[:, -periods:]
    else:
        out[:] = values
    return out


def _div32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, dtype=np.float32)


# Series a feature may roll over; element-wise in float32 like Qlib. "close_on_time" is the close
# regressed on the position in the window (Rsquare, Resi); "a+b" names a pair (Corr).
_SERIES: dict[str, Callable[["_Chunk"], np.ndarray]] = {
    "close": lambda x: x.close,
    "volume": lambda x: x.volume,
    "log_volume": lambda x: np.log(x.volume + np.float32(1)),                                    # Log($volume+1)
    "close_ratio": lambda x: _div32(x.close, _ref(x.close, 1)),                                 # $close/Ref($close,1)
    "log_volume_ratio": lambda x: np.log(_div32(x.volume, _ref(x.volume, 1)) + np.float32(1)),  # Log($volume/Ref($volume,1)+1)
    "weighted_volume": lambda x: np.abs(x.series("close_ratio") - np.float32(1)) * x.volume,   # Abs(...-1)*$volume
}


class _Chunk:
    """A slice of instruments, instrument-major float32 like Qlib's store, plus what features share."""

    def __init__(self, panel: PricePanel, cols: slice, windows: dict[str, set[int]]):
        for name in PRICE_FIELDS:
            setattr(self, name, np.ascontiguousarray(getattr(panel, name)[:, cols].T, dtype=np.float32))
        self._windows = windows
        self._series: dict[str, np.ndarray] = {}
        self._moments: dict[str, dict[int, _Moments]] = {}
        self._same_days: dict[tuple[str, str], bool] = {}

    def series(self, name: str) -> np.ndarray:
        if name not in self._series:
            self._series[name] = _SERIES[name](self)
        return self._series[name]

    def moments(self, group: str, window: int) -> _Moments:
        """Moments of a series (or 'a+b' pair, or 'close_on_time') over `window`; all planned windows at once."""
        done = self._moments.setdefault(group, {})
        if window not in done:
            if group == "close_on_time":
                series, on_time = [self.close], True
            else:
                series, on_time = [self.series(name) for name in group.split("+")], False
            # a window a feature forgot to declare is still computed, just not shared
            wanted = set(self._windows.get(group, ())) - set(done) | {window}
            done.update(_window_moments(series, on_time, sorted(wanted)))
        return done[window]

    def own_std(self, name: str, window: int) -> np.ndarray:
        """Rolling std of one series over its own valid days (Qlib's Std), taken from a planned group that
        holds the series on exactly the same valid days when there is one, else from the series alone."""
        holders = [("close_on_time", 1)] if name == "close" else []
        holders += [(g, g.split("+").index(name)) for g in self._windows if name in g.split("+") and "+" in g]
        for group, index in holders:
            if window in self._windows[group] and self._valid_on_same_days(group, name):
                return self.moments(group, window).std(index)
        return self.moments(name, window).std(0)

    def _valid_on_same_days(self, group: str, name: str) -> bool:
        members = ["close"] if group == "close_on_time" else group.split("+")
        if len(members) == 1:
            return True
        key = (group, name)
        if key not in self._same_days:
            joint = np.logical_and.reduce([np.isfinite(self.series(m)) for m in members])
            self._same_days[key] = bool(np.array_equal(joint, np.isfinite(self.series(name))))
        return self._same_days[key]


# --------------------------------------------------------------------------- the features

@dataclass(frozen=True)
class _Feature:
    compute: Callable[[_Chunk], np.ndarray]
    windows: tuple[tuple[str, int], ...] = ()   # (moment group, window) pairs it reads


def _roc(n: int) -> _Feature:                    # Ref($close, N)/$close
    return _Feature(lambda x: _div32(_ref(x.close, n), x.close))


def _std_close(n: int) -> _Feature:              # Std($close, N)/$close
    return _Feature(lambda x: x.moments("close_on_time", n).std(1) / x.close, (("close_on_time", n),))


def _rsquare(n: int) -> _Feature:                # Rsquare($close, N)
    def compute(x: _Chunk) -> np.ndarray:
        m = x.moments("close_on_time", n)
        r = m.corr(0, 1)
        return np.where(m.std(1) <= _FLAT_STD, np.nan, r * r)
    return _Feature(compute, (("close_on_time", n),))


def _resi(n: int) -> _Feature:                   # Resi($close, N)/$close
    def compute(x: _Chunk) -> np.ndarray:
        m = x.moments("close_on_time", n)
        # residual on the window's last day, which sits at position 0
        fitted = m.mean[1] - m.slope(0, 1) * m.mean[0]
        return (x.close - fitted) / x.close
    return _Feature(compute, (("close_on_time", n),))


def _own(series: str) -> str:
    return "close_on_time" if series == "close" else series


def _corr(left: str, right: str, n: int) -> _Feature:   # Corr(left, right, N)
    def compute(x: _Chunk) -> np.ndarray:
        r = x.moments(f"{left}+{right}", n).corr(0, 1)
        # Qlib blanks the windows where either input, on its own valid days, is flat
        flat = (x.own_std(left, n) <= _FLAT_STD) | (x.own_std(right, n) <= _FLAT_STD)
        return np.where(flat, np.nan, r)
    return _Feature(compute, ((f"{left}+{right}", n), (_own(left), n), (_own(right), n)))


def _vstd(n: int) -> _Feature:                   # Std($volume, N)/($volume+1e-12)
    def compute(x: _Chunk) -> np.ndarray:
        std = x.moments("volume", n).std(0)
        std = _pandas_std_of_zero_windows(x.volume, std, (std == 0) & (x.volume == 0), n)
        return std / (x.volume + np.float32(1e-12))
    return _Feature(compute, (("volume", n),))


def _wvma(n: int) -> _Feature:                   # Std(wv, N)/(Mean(wv, N)+1e-12)
    def compute(x: _Chunk) -> np.ndarray:
        m = x.moments("weighted_volume", n)
        std = m.std(0)
        std = _pandas_std_of_zero_windows(x.series("weighted_volume"), std, (std == 0) & (m.mean[0] == 0), n)
        return std / (m.mean[0] + 1e-12)
    return _Feature(compute, (("weighted_volume", n),))


_FEATURES: dict[str, _Feature] = {
    "KLEN": _Feature(lambda x: _div32(x.high - x.low, x.open)),                          # ($high-$low)/$open
    "KLOW": _Feature(lambda x: _div32(np.minimum(x.open, x.close) - x.low, x.open)),     # (Less($open,$close)-$low)/$open
    **{f"ROC{n}": _roc(n) for n in (60,)},
    **{f"STD{n}": _std_close(n) for n in (5,)},
    **{f"RSQR{n}": _rsquare(n) for n in (5, 10, 20, 60)},
    **{f"RESI{n}": _resi(n) for n in (5, 10)},
    **{f"CORR{n}": _corr("close", "log_volume", n) for n in (5, 10, 20, 60)},
    **{f"CORD{n}": _corr("close_ratio", "log_volume_ratio", n) for n in (5, 10, 60)},
    **{f"VSTD{n}": _vstd(n) for n in (5,)},
    **{f"WVMA{n}": _wvma(n) for n in (5, 60)},
    # Ref($close, -2)/Ref($close, -1) - 1
    LABEL_NAME: _Feature(lambda x: _div32(_ref(x.close, -2), _ref(x.close, -1)) - np.float32(1)),
}


# --------------------------------------------------------------------------- public entry points

def compute_features(panel: PricePanel, names: Sequence[str] = ALPHA158_20) -> dict[str, np.ndarray]:
    """Features by name, float32 [days, instruments]; NaN outside each instrument's first..last bar."""
    by_instrument = _compute(panel, names, _life_from_panel(panel))
    return {name: np.ascontiguousarray(by_instrument.pop(name).T) for name in list(by_instrument)}


def compute_label(panel: PricePanel) -> np.ndarray:
    """LABEL0 = close[t+2]/close[t+1] - 1, float32 [days, instruments]."""
    return compute_features(panel, (LABEL_NAME,))[LABEL_NAME]


def features_frame(bars: pd.DataFrame, feature_set: str = "alpha158_20", calendar=None) -> pd.DataFrame:
    """Long frame date, instrument, features..., LABEL0: a row per day of each instrument's life, as Qlib's,
    sorted by (instrument, date)."""
    if feature_set not in FEATURE_SETS:
        raise ConfigError(f"unknown feature set {feature_set!r}; known: {sorted(FEATURE_SETS)}")
    names = (*FEATURE_SETS[feature_set], LABEL_NAME)
    located = _BarLocations.of(bars, calendar)
    panel = _pivot(bars, located)
    first, last = located.life()
    values = _compute(panel, names, (first, last))
    alive = _alive(first, last, len(panel.dates))                     # [instruments, days]
    table = np.empty((int(alive.sum()), len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        table[:, j] = values.pop(name)[alive]
    frame = pd.DataFrame(table, columns=list(names), copy=False)
    days_alive = alive.sum(axis=1)
    frame.insert(0, "instrument", np.repeat(panel.instruments, days_alive))
    frame.insert(0, "date", np.broadcast_to(panel.dates, alive.shape)[alive].astype("datetime64[ns]"))
    return frame


def _alive(first: np.ndarray, last: np.ndarray, n_days: int) -> np.ndarray:
    """[instruments, days] mask of each instrument's first..last row."""
    day = np.arange(n_days)
    return (day >= first[:, None]) & (day <= last[:, None])


def _life_from_panel(panel: PricePanel) -> tuple[np.ndarray, np.ndarray]:
    """First and last row holding any bar field, per instrument."""
    has_bar = np.zeros(panel.close.shape, dtype=bool)
    for name in PRICE_FIELDS:
        has_bar |= ~np.isnan(getattr(panel, name))
    n_days = has_bar.shape[0]
    any_bar = has_bar.any(axis=0)
    first = np.where(any_bar, has_bar.argmax(axis=0), n_days)
    last = np.where(any_bar, n_days - 1 - has_bar[::-1].argmax(axis=0), -1)
    return first, last


def _compute(panel: PricePanel, names: Sequence[str], life: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Features by name, float32 [instruments, days], computed chunk by chunk of instruments."""
    unknown = [name for name in names if name not in _FEATURES]
    if unknown:
        raise ConfigError(f"unknown feature name(s) {unknown}; known: {sorted(_FEATURES)}")
    windows: dict[str, set[int]] = {}
    for name in names:
        for group, window in _FEATURES[name].windows:
            windows.setdefault(group, set()).add(window)
    n_days, n_inst = panel.close.shape
    out = {name: np.empty((n_inst, n_days), dtype=np.float32) for name in names}
    for start in range(0, n_inst, _CHUNK):
        cols = slice(start, min(start + _CHUNK, n_inst))
        chunk = _Chunk(panel, cols, windows)
        alive = _alive(life[0][cols], life[1][cols], n_days)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for name in names:
                np.copyto(out[name][cols], np.where(alive, _FEATURES[name].compute(chunk), np.nan), casting="unsafe")
    return out
