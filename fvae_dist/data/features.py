"""Qlib's Alpha158 features and LABEL0, as vectorised numpy over a [days, instruments] panel.

    features_frame(bars, feature_set)   long frame date, instrument, features..., LABEL0 (what
                                        `fvae-dist features` writes and `prepare` processes)
    compute_features(panel, names)      the same as [days, instruments] arrays
    FEATURE_SETS                        "alpha158_20" (the paper's 20) and "alpha158" (all 158)

Every feature reproduces what `qlib.data.D.features` (pyqlib 0.9.7) returns for its expression
(see data/alpha158/catalogue.py, which lists them), quirks included:

- element-wise arithmetic runs in float32, as Qlib's binary store is float32 and numpy keeps that
  dtype (it matters: ``Log($volume+1)`` in float32 is only good to ~1e-6);
- rolling operators use min_periods=1 over the valid values of the window (pandas skips NaN and
  treats +-inf as NaN); Std is the sample standard deviation (ddof=1);
- Slope/Rsquare/Resi fit a least-squares line of the value on its position in the window, over the
  window's valid values; Rsquare and Corr are NaN where an input's own rolling std is <= 2e-5;
- IdxMax/IdxMin are numpy's argmax/argmin of the raw window plus one (a NaN in the window wins);
  Quantile interpolates linearly; Rank is pandas' rolling rank(pct=True) (data/alpha158/order.py);
- a comparison such as ``$close>Ref($close, 1)`` is 0 or 1 on every day, False where a side is NaN;
- Ref(x, k) shifts by k rows of the instrument's own series (negative k looks ahead);
- an instrument exists from its first to its last bar; days in between without a bar are NaN rows,
  days outside that span are not rows at all;
- on a window of zeros (a suspension) pandas' rolling std can return the leftover of its running
  sums instead of 0, which VSTD/WVMA divide by 1e-12; those few windows are handed to pandas itself,
  so they follow the installed pandas (and, like Qlib's, depend on where the series starts).

VWAP0 needs a `vwap` (or `amount`) column in the bars (see `bars.bar_vwap`); without one it is NaN,
as Qlib's is on data without $vwap.

Internally everything is instrument-major, [instruments, days], so time runs along contiguous memory;
the window arithmetic lives in data/alpha158/moments.py and data/alpha158/order.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from fvae_dist.data.alpha158.catalogue import ALPHA158, ALPHA158_20, FEATURES, LABEL_NAME, Chunk, plan_windows
from fvae_dist.data.bars import bar_vwap
from fvae_dist.errors import ConfigError, DataError

FEATURE_SETS: dict[str, tuple[str, ...]] = {"alpha158_20": ALPHA158_20, "alpha158": ALPHA158}

BAR_COLUMNS = ("date", "instrument", "open", "high", "low", "close", "volume")
PRICE_FIELDS = ("open", "high", "low", "close", "volume")

# Instruments per internal chunk: keeps the working set of temporaries small and reused.
_CHUNK = 32

__all__ = ["ALPHA158", "ALPHA158_20", "BAR_COLUMNS", "FEATURE_SETS", "LABEL_NAME", "PRICE_FIELDS", "PricePanel",
           "compute_features", "compute_label", "feature_names", "features_frame", "panel_from_bars"]


def feature_names(feature_set: str) -> tuple[str, ...]:
    """The feature columns of a feature set, in Qlib's order; ConfigError for an unknown set."""
    if feature_set not in FEATURE_SETS:
        raise ConfigError(f"--feature-set {feature_set!r}: unknown feature set; expected one of {sorted(FEATURE_SETS)}")
    return FEATURE_SETS[feature_set]


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
    vwap: np.ndarray | None = None  # adjusted like the prices; None when the bars have none (VWAP0 is NaN)


# --------------------------------------------------------------------------- panel construction

def panel_from_bars(bars: pd.DataFrame, calendar: np.ndarray | None = None) -> PricePanel:
    """Pivot a long frame of bars onto `calendar` (default: the union of the bars' dates)."""
    return _pivot(bars, _BarLocations.of(bars, calendar))


def _pivot(bars: pd.DataFrame, located: "_BarLocations") -> PricePanel:
    shape = (len(located.calendar), len(located.instruments))

    def grid_of(values) -> np.ndarray:
        grid = np.full(shape, np.nan)
        grid[located.rows, located.cols] = values
        return grid

    fields = {name: grid_of(pd.to_numeric(bars[name], errors="raise").to_numpy(dtype=np.float64)) for name in PRICE_FIELDS}
    vwap = bar_vwap(bars)
    return PricePanel(dates=located.calendar, instruments=located.instruments, **fields,
                      vwap=None if vwap is None else grid_of(vwap))


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


# --------------------------------------------------------------------------- public entry points

def compute_features(panel: PricePanel, names: Sequence[str] = ALPHA158_20) -> dict[str, np.ndarray]:
    """Features by name, float32 [days, instruments]; NaN outside each instrument's first..last bar."""
    n_days, n_inst = panel.close.shape
    out = {name: np.empty((n_days, n_inst), dtype=np.float32) for name in names}
    first, last = _life_from_panel(panel)

    def write(name: str, cols: slice, values: np.ndarray) -> None:
        out[name][:, cols] = np.where(_alive(first[cols], last[cols], n_days), values, np.nan).T

    _compute(panel, names, (first, last), write)
    return out


def compute_label(panel: PricePanel) -> np.ndarray:
    """LABEL0 = close[t+2]/close[t+1] - 1, float32 [days, instruments]."""
    return compute_features(panel, (LABEL_NAME,))[LABEL_NAME]


def features_frame(bars: pd.DataFrame, feature_set: str = "alpha158_20", calendar=None, *,
                   span: tuple | None = None) -> pd.DataFrame:
    """Long frame date, instrument, features..., LABEL0: a row per day of each instrument's life, as Qlib's,
    sorted by (instrument, date). span=(first, last): only the rows of those days (the windows still
    see every bar given)."""
    names = (*feature_names(feature_set), LABEL_NAME)
    located = _BarLocations.of(bars, calendar)
    panel = _pivot(bars, located)
    first, last = located.life()
    rows = _alive(first, last, len(panel.dates))                      # [instruments, days]
    if span is not None:
        in_span = (panel.dates >= np.datetime64(span[0], "D")) & (panel.dates <= np.datetime64(span[1], "D"))
        rows &= in_span[None, :]
    rows_per_instrument = rows.sum(axis=1)
    row_start = np.concatenate([[0], np.cumsum(rows_per_instrument)])
    # written chunk by chunk straight into the table: no per-feature panels of the whole frame; column-major,
    # so each write is contiguous and pandas takes the columns without a copy
    table = np.empty((int(row_start[-1]), len(names)), dtype=np.float32, order="F")
    column = {name: j for j, name in enumerate(names)}

    def write(name: str, cols: slice, values: np.ndarray) -> None:
        table[row_start[cols.start]: row_start[cols.stop], column[name]] = values[rows[cols]]

    _compute(panel, names, (first, last), write)
    frame = pd.DataFrame(table, columns=list(names), copy=False)
    frame.insert(0, "instrument", np.repeat(panel.instruments, rows_per_instrument))
    frame.insert(0, "date", np.broadcast_to(panel.dates, rows.shape)[rows].astype("datetime64[ns]"))
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


def _compute(panel: PricePanel, names: Sequence[str], life: tuple[np.ndarray, np.ndarray],
             write: Callable[[str, slice, np.ndarray], None]) -> None:
    """Compute the features chunk by chunk of instruments; write(name, instrument slice, values) receives
    each chunk's [instruments, days] values (float32 or float64; days outside an instrument's life are
    meaningless and must be masked or skipped)."""
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise ConfigError(f"unknown feature name(s) {unknown}; known: {sorted(FEATURES)}")
    plan = plan_windows(names)
    n_days, n_inst = panel.close.shape
    for start in range(0, n_inst, _CHUNK):
        cols = slice(start, min(start + _CHUNK, n_inst))
        fields = {name: getattr(panel, name)[:, cols].T for name in PRICE_FIELDS}
        vwap = panel.vwap[:, cols].T if panel.vwap is not None else np.full((cols.stop - start, n_days), np.nan)
        chunk = Chunk({**fields, "vwap": vwap}, life[0][cols], life[1][cols], plan)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for name in names:
                write(name, cols, FEATURES[name].compute(chunk))
