"""The Alpha158 features and LABEL0: what each one computes, in Qlib's own expression (beside it).

Names and order are Qlib's (qlib/contrib/data/handler.py, Alpha158.get_feature_config): the nine
KBAR features, OPEN0/HIGH0/LOW0/VWAP0, then 29 rolling operators over windows 5, 10, 20, 30, 60.

A feature reads the price fields and the series built from them through a `Chunk` (a slice of
instruments), which computes each series and each rolling statistic once and shares it, over all the
windows the requested features need at once. Element-wise arithmetic runs in float32 like Qlib's
(its binary store is float32 and numpy keeps the dtype); rolling statistics come back in float64,
as pandas returns them, and so does what is computed from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fvae_dist.data.alpha158 import moments as mom
from fvae_dist.data.alpha158 import order

WINDOWS = (5, 10, 20, 30, 60)
KBAR = ("KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2")
PRICE = ("OPEN0", "HIGH0", "LOW0", "VWAP0")
ROLLING = ("ROC", "MA", "STD", "BETA", "RSQR", "RESI", "MAX", "MIN", "QTLU", "QTLD", "RANK", "RSV",
           "IMAX", "IMIN", "IMXD", "CORR", "CORD", "CNTP", "CNTN", "CNTD", "SUMP", "SUMN", "SUMD",
           "VMA", "VSTD", "WVMA", "VSUMP", "VSUMN", "VSUMD")
ALPHA158: tuple[str, ...] = (*KBAR, *PRICE, *(f"{op}{n}" for op in ROLLING for n in WINDOWS))
# the subset Qlib's time-series benchmarks (and the paper) use
ALPHA158_20: tuple[str, ...] = (
    "KLEN", "KLOW", "ROC60", "STD5",
    "RSQR5", "RSQR10", "RSQR20", "RSQR60",
    "RESI5", "RESI10",
    "CORR5", "CORR10", "CORR20", "CORR60",
    "CORD5", "CORD10", "CORD60",
    "VSTD5", "WVMA5", "WVMA60",
)
LABEL_NAME = "LABEL0"
FIELDS = ("open", "high", "low", "close", "volume", "vwap")

# Qlib (ops.py, Rsquare and Corr): a window whose rolling std is within 2e-5 of zero gives NaN.
_FLAT_STD = 2e-5
QUANTILE_LEVELS = (0.2, 0.8)   # QTLD, QTLU
_EPS = 1e-12                   # Qlib's guard against a zero denominator, "+1e-12"
_EPS32 = np.float32(_EPS)      # ... added to a float32 series, it stays float32


# --------------------------------------------------------------------------- series the features share

def ref(values: np.ndarray, periods: int) -> np.ndarray:
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


def _in_life(chunk: "Chunk", condition: np.ndarray) -> np.ndarray:
    """A comparison as Qlib's rolling Mean sees it: 0/1 on every day of the instrument's series (a
    comparison with NaN is False, not missing), and no value outside that series."""
    return np.where(chunk.alive, condition.astype(np.float64), np.nan)


def _change(field: str) -> Callable[["Chunk"], np.ndarray]:
    return lambda x: getattr(x, field) - ref(getattr(x, field), 1)      # $f-Ref($f, 1), float32


# Series a feature may roll over; element-wise in float32 like Qlib.
_SERIES: dict[str, Callable[["Chunk"], np.ndarray]] = {
    **{name: (lambda name: lambda x: getattr(x, name))(name) for name in FIELDS},
    "log_volume": lambda x: np.log(x.volume + np.float32(1)),                                    # Log($volume+1)
    "close_ratio": lambda x: _div32(x.close, ref(x.close, 1)),                                  # $close/Ref($close,1)
    "log_volume_ratio": lambda x: np.log(_div32(x.volume, ref(x.volume, 1)) + np.float32(1)),   # Log($volume/Ref($volume,1)+1)
    "weighted_volume": lambda x: np.abs(x.series("close_ratio") - np.float32(1)) * x.volume,    # Abs(...-1)*$volume
    "close_up": lambda x: _in_life(x, x.close > ref(x.close, 1)),                               # $close>Ref($close, 1)
    "close_down": lambda x: _in_life(x, x.close < ref(x.close, 1)),                             # $close<Ref($close, 1)
    **{f"{f}_change": _change(f) for f in ("close", "volume")},
    **{f"{f}_gain": (lambda f: lambda x: np.maximum(x.series(f"{f}_change"), 0))(f)             # Greater($f-Ref($f, 1), 0)
       for f in ("close", "volume")},
    **{f"{f}_loss": (lambda f: lambda x: np.maximum(-x.series(f"{f}_change"), 0))(f)            # Greater(Ref($f, 1)-$f, 0)
       for f in ("close", "volume")},
    **{f"{f}_move": (lambda f: lambda x: np.abs(x.series(f"{f}_change")))(f)                    # Abs($f-Ref($f, 1))
       for f in ("close", "volume")},
}

# Rolling statistics by operator: (chunk, series name, windows) -> {window: values}
_ROLLED: dict[str, Callable] = {
    "max": lambda x, s, ws: order.rolling_extreme(x.series(s), ws, largest=True),
    "min": lambda x, s, ws: order.rolling_extreme(x.series(s), ws, largest=False),
    "idxmax": lambda x, s, ws: order.rolling_extreme_position(x.series(s), x.first_day, ws, largest=True),
    "idxmin": lambda x, s, ws: order.rolling_extreme_position(x.series(s), x.first_day, ws, largest=False),
    "quantiles": lambda x, s, ws: order.rolling_quantiles(x.series(s), ws, QUANTILE_LEVELS),
    "rank": lambda x, s, ws: order.rolling_rank(x.series(s), ws),
    "sum": lambda x, s, ws: {w: total for w, (total, _) in mom.rolling_sums(x.series(s), ws).items()},
    "mean": lambda x, s, ws: {w: total / n for w, (total, n) in mom.rolling_sums(x.series(s), ws).items()},
}


class Chunk:
    """A slice of instruments, instrument-major float32 like Qlib's store, plus what features share.

    fields: open, high, low, close, volume, vwap as [instruments, days]; first_day/last_day: each
    instrument's first and last day (index on the day axis); plan: the windows each moment group or
    rolling statistic will be asked for, so that one pass computes them all."""

    def __init__(self, fields: dict[str, np.ndarray], first_day: np.ndarray, last_day: np.ndarray,
                 plan: dict[str, set[int]]):
        for name in FIELDS:
            setattr(self, name, np.ascontiguousarray(fields[name], dtype=np.float32))
        day = np.arange(self.close.shape[1])
        self.first_day = first_day
        self.alive = (day >= first_day[:, None]) & (day <= last_day[:, None])
        self._plan = plan
        self._series: dict[str, np.ndarray] = {}
        self._computed: dict[str, dict] = {}
        self._same_days: dict[tuple[str, str], bool] = {}

    def series(self, name: str) -> np.ndarray:
        if name not in self._series:
            self._series[name] = _SERIES[name](self)
        return self._series[name]

    def _all_windows(self, group: str, window: int, compute: Callable[[list[int]], dict]):
        """`compute` for every planned window of `group` (and `window`) at once; the one asked for."""
        done = self._computed.setdefault(group, {})
        if window not in done:
            # a window a feature forgot to declare is still computed, just not shared
            wanted = set(self._plan.get(group, ())) - set(done) | {window}
            done.update(compute(sorted(wanted)))
        return done[window]

    def rolled(self, group: str, window: int):
        """A rolling statistic, group "<operator>:<series>" (e.g. "max:high"), over `window` days."""
        op, name = group.split(":")
        return self._all_windows(group, window, lambda ws: _ROLLED[op](self, name, ws))

    def moments(self, group: str, window: int) -> mom.Moments:
        """Moments of a series (or 'a+b' pair, or 'close_on_time': the close regressed on its position
        in the window) over `window`; all planned windows at once."""
        def compute(windows: list[int]) -> dict[int, mom.Moments]:
            if group == "close_on_time":
                return mom.window_moments([self.close], True, windows)
            return mom.window_moments([self.series(name) for name in group.split("+")], False, windows)
        return self._all_windows(group, window, compute)

    def own_std(self, name: str, window: int) -> np.ndarray:
        """Rolling std of one series over its own valid days (Qlib's Std), taken from a planned group that
        holds the series on exactly the same valid days when there is one, else from the series alone."""
        holders = [("close_on_time", 1)] if name == "close" else []
        holders += [(g, g.split("+").index(name)) for g in self._plan if name in g.split("+") and "+" in g]
        for group, index in holders:
            if window in self._plan[group] and self._valid_on_same_days(group, name):
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
class Feature:
    compute: Callable[[Chunk], np.ndarray]
    windows: tuple[tuple[str, int], ...] = ()   # (moment group or rolling statistic, window) pairs it reads


def _rolled(group: str, n: int, then: Callable[[Chunk, np.ndarray], np.ndarray]) -> Feature:
    return Feature(lambda x: then(x, x.rolled(group, n)), ((group, n),))


def _roc(n: int) -> Feature:                     # Ref($close, N)/$close
    return Feature(lambda x: _div32(ref(x.close, n), x.close))


def _on_time(n: int, then: Callable[[Chunk, mom.Moments], np.ndarray]) -> Feature:
    """A statistic of the close's least-squares line on time (variable 0: position, 1: close)."""
    return Feature(lambda x: then(x, x.moments("close_on_time", n)), (("close_on_time", n),))


def _rsquare(x: Chunk, m: mom.Moments) -> np.ndarray:     # Rsquare($close, N)
    r = m.corr(0, 1)
    return np.where(m.std(1) <= _FLAT_STD, np.nan, r * r)


def _resi(x: Chunk, m: mom.Moments) -> np.ndarray:        # Resi($close, N)/$close
    # residual on the window's last day, which sits at position 0
    fitted = m.mean[1] - m.slope(0, 1) * m.mean[0]
    return (x.close - fitted) / x.close


def _own(series: str) -> str:
    return "close_on_time" if series == "close" else series


def _corr(left: str, right: str, n: int) -> Feature:     # Corr(left, right, N)
    def compute(x: Chunk) -> np.ndarray:
        r = x.moments(f"{left}+{right}", n).corr(0, 1)
        # Qlib blanks the windows where either input, on its own valid days, is flat
        flat = (x.own_std(left, n) <= _FLAT_STD) | (x.own_std(right, n) <= _FLAT_STD)
        return np.where(flat, np.nan, r)
    return Feature(compute, ((f"{left}+{right}", n), (_own(left), n), (_own(right), n)))


def _vstd(n: int) -> Feature:                    # Std($volume, N)/($volume+1e-12)
    def compute(x: Chunk) -> np.ndarray:
        std = x.moments("volume", n).std(0)
        std = mom.pandas_std_of_zero_windows(x.volume, std, (std == 0) & (x.volume == 0), n)
        return std / (x.volume + _EPS32)
    return Feature(compute, (("volume", n),))


def _wvma(n: int) -> Feature:                    # Std(wv, N)/(Mean(wv, N)+1e-12)
    def compute(x: Chunk) -> np.ndarray:
        m = x.moments("weighted_volume", n)
        std = m.std(0)
        std = mom.pandas_std_of_zero_windows(x.series("weighted_volume"), std, (std == 0) & (m.mean[0] == 0), n)
        return std / (m.mean[0] + _EPS)
    return Feature(compute, (("weighted_volume", n),))


def _rsv(n: int) -> Feature:                     # ($close-Min($low, N))/(Max($high, N)-Min($low, N)+1e-12)
    def compute(x: Chunk) -> np.ndarray:
        high, low = x.rolled("max:high", n), x.rolled("min:low", n)
        return (x.close - low) / (high - low + _EPS)
    return Feature(compute, (("max:high", n), ("min:low", n)))


def _imxd(n: int) -> Feature:                    # (IdxMax($high, N)-IdxMin($low, N))/N
    return Feature(lambda x: (x.rolled("idxmax:high", n) - x.rolled("idxmin:low", n)) / n,
                   (("idxmax:high", n), ("idxmin:low", n)))


def _cntd(n: int) -> Feature:                    # Mean($close>Ref($close, 1), N)-Mean($close<Ref($close, 1), N)
    return Feature(lambda x: x.rolled("mean:close_up", n) - x.rolled("mean:close_down", n),
                   (("mean:close_up", n), ("mean:close_down", n)))


def _share(field: str, part: str, n: int) -> Feature:
    """Sum(Greater($f-Ref($f, 1), 0), N)/(Sum(Abs($f-Ref($f, 1)), N)+1e-12) for part "gain", Greater(Ref-$f, 0)
    for "loss", and (Sum(gain)-Sum(loss))/(...) for "net": SUMP/SUMN/SUMD on the close, VSUM* on the volume."""
    gain, loss, move = (f"sum:{field}_{p}" for p in ("gain", "loss", "move"))

    def compute(x: Chunk) -> np.ndarray:
        if part == "net":
            numerator = x.rolled(gain, n) - x.rolled(loss, n)
        else:
            numerator = x.rolled(gain if part == "gain" else loss, n)
        return numerator / (x.rolled(move, n) + _EPS)
    used = (gain, loss) if part == "net" else ((gain,) if part == "gain" else (loss,))
    return Feature(compute, tuple((g, n) for g in (*used, move)))


def _range(op: str) -> Feature:                  # ($f-$g)/$open or /($high-$low+1e-12), float32
    return Feature(lambda x: _div32(_KBAR_PARTS[op](x), x.open))


def _range2(op: str) -> Feature:
    return Feature(lambda x: _div32(_KBAR_PARTS[op](x), x.high - x.low + _EPS32))


_KBAR_PARTS: dict[str, Callable[[Chunk], np.ndarray]] = {
    "MID": lambda x: x.close - x.open,                              # $close-$open
    "UP": lambda x: x.high - np.maximum(x.open, x.close),           # $high-Greater($open, $close)
    "LOW": lambda x: np.minimum(x.open, x.close) - x.low,           # Less($open, $close)-$low
    "SFT": lambda x: np.float32(2) * x.close - x.high - x.low,      # 2*$close-$high-$low
}


def _per_window(make: Callable[[int], Feature], prefix: str) -> dict[str, Feature]:
    return {f"{prefix}{n}": make(n) for n in WINDOWS}


FEATURES: dict[str, Feature] = {
    "KMID": _range("MID"),
    "KLEN": Feature(lambda x: _div32(x.high - x.low, x.open)),                                       # ($high-$low)/$open
    "KMID2": _range2("MID"),
    "KUP": _range("UP"),
    "KUP2": _range2("UP"),
    "KLOW": _range("LOW"),
    "KLOW2": _range2("LOW"),
    "KSFT": _range("SFT"),
    "KSFT2": _range2("SFT"),
    **{f"{f.upper()}0": (lambda f: Feature(lambda x: _div32(getattr(x, f), x.close)))(f)           # $f/$close
       for f in ("open", "high", "low", "vwap")},
    **_per_window(_roc, "ROC"),
    **_per_window(lambda n: _on_time(n, lambda x, m: m.mean[1] / x.close), "MA"),                   # Mean($close, N)/$close
    **_per_window(lambda n: _on_time(n, lambda x, m: m.std(1) / x.close), "STD"),                   # Std($close, N)/$close
    **_per_window(lambda n: _on_time(n, lambda x, m: m.slope(0, 1) / x.close), "BETA"),             # Slope($close, N)/$close
    **_per_window(lambda n: _on_time(n, _rsquare), "RSQR"),
    **_per_window(lambda n: _on_time(n, _resi), "RESI"),
    **_per_window(lambda n: _rolled("max:high", n, lambda x, v: v / x.close), "MAX"),               # Max($high, N)/$close
    **_per_window(lambda n: _rolled("min:low", n, lambda x, v: v / x.close), "MIN"),                # Min($low, N)/$close
    **_per_window(lambda n: _rolled("quantiles:close", n, lambda x, v: v[0.8] / x.close), "QTLU"),  # Quantile($close, N, 0.8)/$close
    **_per_window(lambda n: _rolled("quantiles:close", n, lambda x, v: v[0.2] / x.close), "QTLD"),  # Quantile($close, N, 0.2)/$close
    **_per_window(lambda n: _rolled("rank:close", n, lambda x, v: v), "RANK"),                      # Rank($close, N)
    **_per_window(_rsv, "RSV"),
    **_per_window(lambda n: _rolled("idxmax:high", n, lambda x, v: v / n), "IMAX"),                 # IdxMax($high, N)/N
    **_per_window(lambda n: _rolled("idxmin:low", n, lambda x, v: v / n), "IMIN"),                  # IdxMin($low, N)/N
    **_per_window(_imxd, "IMXD"),
    **_per_window(lambda n: _corr("close", "log_volume", n), "CORR"),       # Corr($close, Log($volume+1), N)
    **_per_window(lambda n: _corr("close_ratio", "log_volume_ratio", n), "CORD"),
    **_per_window(lambda n: _rolled("mean:close_up", n, lambda x, v: v), "CNTP"),                   # Mean($close>Ref($close, 1), N)
    **_per_window(lambda n: _rolled("mean:close_down", n, lambda x, v: v), "CNTN"),                 # Mean($close<Ref($close, 1), N)
    **_per_window(_cntd, "CNTD"),
    **_per_window(lambda n: _share("close", "gain", n), "SUMP"),
    **_per_window(lambda n: _share("close", "loss", n), "SUMN"),
    **_per_window(lambda n: _share("close", "net", n), "SUMD"),
    **_per_window(lambda n: Feature(lambda x: x.moments("volume", n).mean[0] / (x.volume + _EPS32),  # Mean($volume, N)/($volume+1e-12)
                                    (("volume", n),)), "VMA"),
    **_per_window(_vstd, "VSTD"),
    **_per_window(_wvma, "WVMA"),
    **_per_window(lambda n: _share("volume", "gain", n), "VSUMP"),
    **_per_window(lambda n: _share("volume", "loss", n), "VSUMN"),
    **_per_window(lambda n: _share("volume", "net", n), "VSUMD"),
    # Ref($close, -2)/Ref($close, -1) - 1
    LABEL_NAME: Feature(lambda x: _div32(ref(x.close, -2), ref(x.close, -1)) - np.float32(1)),
}
assert set(ALPHA158) | {LABEL_NAME} == set(FEATURES), "every Alpha158 name has one definition"


def plan_windows(names) -> dict[str, set[int]]:
    """The windows each moment group or rolling statistic will be asked for by these features."""
    plan: dict[str, set[int]] = {}
    for name in names:
        for group, window in FEATURES[name].windows:
            plan.setdefault(group, set()).add(window)
    return plan
