"""The full Alpha158 set: Qlib's names and order, Qlib's expressions evaluated the slow way with pandas,
Qlib's own values on real data (one test per column), and VWAP0 from a vwap or amount column."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from fvae_dist.data.long_table import LongTableSource
from fvae_dist.data.features import ALPHA158, ALPHA158_20, FEATURE_SETS, LABEL_NAME, features_frame
from fvae_dist.errors import DataError
from tests.conftest import CSI300_DIR, REFERENCE_DIR
from tests.data.test_features import assert_close_like_qlib, bars_of, synthetic_market

REFERENCE = REFERENCE_DIR / "alpha158_full_sample.parquet"
EXPRESSIONS = REFERENCE_DIR / "alpha158_expressions.txt"
WINDOWS = (5, 10, 20, 30, 60)

# Qlib's Alpha158 expressions (qlib/contrib/data/loader.py, Alpha158DL with the handler's config), written
# out as templates: the oracle below evaluates these strings, and a real-data test checks them against the
# expression list Qlib's own source gives.
FIXED = {
    "KMID": "($close-$open)/$open",
    "KLEN": "($high-$low)/$open",
    "KMID2": "($close-$open)/($high-$low+1e-12)",
    "KUP": "($high-Greater($open, $close))/$open",
    "KUP2": "($high-Greater($open, $close))/($high-$low+1e-12)",
    "KLOW": "(Less($open, $close)-$low)/$open",
    "KLOW2": "(Less($open, $close)-$low)/($high-$low+1e-12)",
    "KSFT": "(2*$close-$high-$low)/$open",
    "KSFT2": "(2*$close-$high-$low)/($high-$low+1e-12)",
    "OPEN0": "$open/$close",
    "HIGH0": "$high/$close",
    "LOW0": "$low/$close",
    "VWAP0": "$vwap/$close",
}
_UP, _DOWN = "Mean($close>Ref($close, 1), {n})", "Mean($close<Ref($close, 1), {n})"
_GAIN, _LOSS = "Sum(Greater(${f}-Ref(${f}, 1), 0), {n})", "Sum(Greater(Ref(${f}, 1)-${f}, 0), {n})"
_MOVE = "(Sum(Abs(${f}-Ref(${f}, 1)), {n})+1e-12)"
_WV = "Abs($close/Ref($close, 1)-1)*$volume"
ROLLING = {
    "ROC": "Ref($close, {n})/$close",
    "MA": "Mean($close, {n})/$close",
    "STD": "Std($close, {n})/$close",
    "BETA": "Slope($close, {n})/$close",
    "RSQR": "Rsquare($close, {n})",
    "RESI": "Resi($close, {n})/$close",
    "MAX": "Max($high, {n})/$close",
    "MIN": "Min($low, {n})/$close",
    "QTLU": "Quantile($close, {n}, 0.8)/$close",
    "QTLD": "Quantile($close, {n}, 0.2)/$close",
    "RANK": "Rank($close, {n})",
    "RSV": "($close-Min($low, {n}))/(Max($high, {n})-Min($low, {n})+1e-12)",
    "IMAX": "IdxMax($high, {n})/{n}",
    "IMIN": "IdxMin($low, {n})/{n}",
    "IMXD": "(IdxMax($high, {n})-IdxMin($low, {n}))/{n}",
    "CORR": "Corr($close, Log($volume+1), {n})",
    "CORD": "Corr($close/Ref($close,1), Log($volume/Ref($volume, 1)+1), {n})",
    "CNTP": _UP,
    "CNTN": _DOWN,
    "CNTD": f"{_UP}-{_DOWN}",
    "SUMP": f"{_GAIN}/{_MOVE}".replace("{f}", "close"),
    "SUMN": f"{_LOSS}/{_MOVE}".replace("{f}", "close"),
    "SUMD": f"({_GAIN}-{_LOSS})/{_MOVE}".replace("{f}", "close"),
    "VMA": "Mean($volume, {n})/($volume+1e-12)",
    "VSTD": "Std($volume, {n})/($volume+1e-12)",
    "WVMA": f"Std({_WV}, {{n}})/(Mean({_WV}, {{n}})+1e-12)",
    "VSUMP": f"{_GAIN}/{_MOVE}".replace("{f}", "volume"),
    "VSUMN": f"{_LOSS}/{_MOVE}".replace("{f}", "volume"),
    "VSUMD": f"({_GAIN}-{_LOSS})/{_MOVE}".replace("{f}", "volume"),
}
EXPRESSION = {**FIXED, **{f"{op}{n}": t.format(n=n) for op, t in ROLLING.items() for n in WINDOWS},
              LABEL_NAME: "Ref($close, -2)/Ref($close, -1) - 1"}


# --------------------------------------------------------------------------- names and order

def test_the_158_names_in_qlibs_order():
    assert len(ALPHA158) == 158 and len(set(ALPHA158)) == 158
    assert FEATURE_SETS["alpha158"] == ALPHA158 and set(ALPHA158_20) < set(ALPHA158)
    assert list(ALPHA158) == [name for name in EXPRESSION if name != LABEL_NAME]
    assert ALPHA158[:13] == tuple(FIXED) and ALPHA158[13:18] == ("ROC5", "ROC10", "ROC20", "ROC30", "ROC60")
    assert ALPHA158[-1] == "VSUMD60"


@pytest.mark.real_data
def test_names_order_and_expressions_are_qlibs():
    if not EXPRESSIONS.is_file():
        pytest.skip(f"Qlib's expression list not found at {EXPRESSIONS} (expected ../shared beside the repository)")
    listed = [line.split("\t") for line in EXPRESSIONS.read_text().splitlines() if line and not line.startswith("#")]
    assert [name for name, _ in listed] == [*ALPHA158, LABEL_NAME]
    for name, expression in listed:
        assert EXPRESSION[name] == expression, name


# --------------------------------------------------------------------------- Qlib's expressions, the slow way

def _rolling(n):
    return lambda s: s.rolling(n, min_periods=1)


def _flat(s, n):
    return np.isclose(s.rolling(n, min_periods=1).std(), 0, atol=2e-5)


def _line(s, n, want):
    """Least-squares line of the window's valid values on their position: slope, R^2 or last residual."""
    y_all = s.to_numpy(np.float64)
    out = np.full(len(y_all), np.nan)
    for t in range(len(y_all)):
        y = y_all[max(0, t - n + 1): t + 1]
        x = np.arange(len(y), dtype=float)
        ok = ~np.isnan(y)
        if ok.sum() < 2:
            continue
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        out[t] = {"slope": slope, "r2": np.corrcoef(x[ok], y[ok])[0, 1] ** 2,
                  "resi": y[-1] - (slope * x[-1] + intercept)}[want]
    return pd.Series(out, index=s.index)


def _rsquare(s, n):
    r2 = _line(s, n, "r2")
    r2[_flat(s, n)] = np.nan
    return r2


def _corr(a, b, n):
    r = a.rolling(n, min_periods=1).corr(b)
    r[_flat(a, n) | _flat(b, n)] = np.nan
    return r


OPERATORS = {
    "Ref": lambda s, n: s.shift(n),
    "Mean": lambda s, n: _rolling(n)(s).mean(),
    "Sum": lambda s, n: _rolling(n)(s).sum(),
    "Std": lambda s, n: _rolling(n)(s).std(),
    "Max": lambda s, n: _rolling(n)(s).max(),
    "Min": lambda s, n: _rolling(n)(s).min(),
    "Quantile": lambda s, n, q: _rolling(n)(s).quantile(q),
    "Rank": lambda s, n: _rolling(n)(s).rank(pct=True),
    "IdxMax": lambda s, n: _rolling(n)(s).apply(lambda w: w.argmax() + 1, raw=True),
    "IdxMin": lambda s, n: _rolling(n)(s).apply(lambda w: w.argmin() + 1, raw=True),
    "Slope": lambda s, n: _line(s, n, "slope"),
    "Rsquare": _rsquare,
    "Resi": lambda s, n: _line(s, n, "resi"),
    "Corr": _corr,
    "Greater": np.maximum,
    "Less": np.minimum,
    "Abs": np.abs,
    "Log": np.log,
}


def qlib_expression(expression: str, bars: pd.DataFrame) -> pd.Series:
    """Evaluate a Qlib expression over one instrument's float32 bars with pandas' rolling operators
    (min_periods=1), the way Qlib's ops.py composes them."""
    fields = {f: pd.Series(bars[f].to_numpy(np.float32)) for f in ("open", "high", "low", "close", "volume")}
    fields["vwap"] = pd.Series(bars["vwap"].to_numpy(np.float32)) if "vwap" in bars else fields["close"] * np.nan
    return eval(re.sub(r"\$(\w+)", r"\1", expression), {"__builtins__": {}}, {**OPERATORS, **fields})


@pytest.fixture(scope="module")
def market():
    bars = synthetic_market(seed=5, n_days=150)
    rng = np.random.default_rng(1)
    bars["vwap"] = bars["low"] + (bars["high"] - bars["low"]) * rng.uniform(0.2, 0.8, len(bars))
    # a stock whose high repeats (ties for IdxMax), with a bar missing inside the window (NaN wins there)
    tied = bars_of(np.r_[np.linspace(10, 11, 30), np.full(20, 11.0), np.linspace(11, 10, 30)], instrument="SZ300999")
    tied["vwap"] = tied["close"]
    tied = tied.drop(index=[40, 41])
    bars = pd.concat([bars, tied], ignore_index=True)
    return bars, features_frame(bars, "alpha158")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the oracle's corrcoef/polyfit of flat windows
@pytest.mark.parametrize("name", [*ALPHA158, LABEL_NAME])
def test_each_feature_matches_qlibs_expression_evaluated_with_pandas(market, name):
    bars, ours = market
    for instrument, rows in ours.groupby("instrument"):
        mine = bars[bars["instrument"] == instrument].set_index("date").reindex(rows["date"]).reset_index()
        expected = qlib_expression(EXPRESSION[name], mine)
        assert_close_like_qlib(rows[name], expected, f"{instrument} {name}")


def test_idxmax_counts_from_the_window_start_and_a_missing_bar_wins():
    high = [3.0, 5.0, 5.0, 4.0, 2.0, 1.0, 1.0, np.nan, 1.0]
    bars = bars_of(np.ones(len(high)))
    bars["high"] = high
    frame = features_frame(bars, "alpha158")
    # windows of 5 days: the first maximum's 1-based position, divided by 5
    # day 3: 3,5,5,4 -> the first 5; day 6: 5,4,2,1,1 -> 1; day 7: 4,2,1,1,NaN -> the NaN at position 5
    expected = [1, 2, 2, 2, 2, 1, 1, 5, 4]
    np.testing.assert_allclose(frame["IMAX5"], np.array(expected) / 5)


# --------------------------------------------------------------------------- Qlib's own values

@pytest.fixture(scope="module")
def qlib_reference():
    if not REFERENCE.is_file() or not (CSI300_DIR / "stocks_daily.parquet").is_file():
        pytest.skip(f"Qlib's Alpha158 reference values or the CSI300 bars not found under {REFERENCE_DIR.parent} "
                    "(expected ../shared beside the repository)")
    reference = pd.read_parquet(REFERENCE).sort_values(["instrument", "date"]).reset_index(drop=True)
    instruments = sorted(reference["instrument"].unique())
    bars = pd.read_parquet(CSI300_DIR / "stocks_daily.parquet", filters=[("instrument", "in", instruments)])
    calendar = pd.read_csv(CSI300_DIR / "calendar.csv").iloc[:, 0].to_numpy()
    # Qlib computed 2010-01-04 .. 2016-12-31 (LABEL0 reads two later closes) and kept 2015-2016
    kept = (reference["date"].min(), reference["date"].max())
    ours = features_frame(bars, "alpha158", calendar=calendar, span=kept)
    assert list(reference.columns) == ["date", "instrument", *ALPHA158, LABEL_NAME]
    np.testing.assert_array_equal(ours["instrument"].to_numpy(str), reference["instrument"].to_numpy(str))
    np.testing.assert_array_equal(ours["date"].to_numpy("datetime64[D]"), reference["date"].to_numpy("datetime64[D]"))
    return ours, reference


@pytest.mark.real_data
@pytest.mark.parametrize("name", [*ALPHA158, LABEL_NAME])
def test_matches_qlibs_values_on_real_data(qlib_reference, name):
    ours, reference = qlib_reference
    assert_close_like_qlib(ours[name], reference[name], name)


# --------------------------------------------------------------------------- VWAP0

def test_vwap0_from_a_vwap_column_and_nan_without_one():
    bars = bars_of([10.0, 10.4, 10.2, 10.9])
    assert np.isnan(features_frame(bars, "alpha158")["VWAP0"]).all()
    bars["vwap"] = [10.1, 10.3, np.nan, 10.8]
    vwap0 = features_frame(bars, "alpha158")["VWAP0"].to_numpy()
    expected = np.float32(bars["vwap"]) / np.float32(bars["close"])
    np.testing.assert_array_equal(vwap0, expected.astype(np.float32))


def test_vwap0_from_amount_is_amount_over_volume_times_factor():
    # adjusted prices (raw x factor), raw volume in shares, raw amount in currency: Qlib's convention
    factor = np.array([2.0, 2.0, 2.5, 2.5])
    raw_close, raw_vwap = np.array([5.0, 5.2, 4.1, 4.3]), np.array([5.05, 5.1, 4.0, 4.25])
    volume = np.array([1000.0, 1200.0, 0.0, 900.0])                # day 2 suspended: no vwap
    bars = bars_of(raw_close * factor, volume)
    bars["factor"] = factor
    bars["amount"] = raw_vwap * volume
    vwap0 = features_frame(bars, "alpha158")["VWAP0"].to_numpy()
    np.testing.assert_allclose(vwap0[[0, 1, 3]], (raw_vwap / raw_close)[[0, 1, 3]], rtol=1e-6)
    assert np.isnan(vwap0[2])


def test_an_amount_in_the_wrong_units_is_refused():
    bars = bars_of([10.0, 10.4, 10.2])
    bars["amount"] = bars["close"] * bars["volume"] / 1000      # thousands of currency units
    with pytest.raises(DataError, match="'amount'.*0.001x the close.*shares"):
        features_frame(bars, "alpha158")


def test_a_long_table_hands_its_amount_column_to_the_features(tmp_path):
    bars = bars_of(np.linspace(10, 11, 8))
    bars["amount"] = bars["close"] * 0.99 * bars["volume"]
    path = tmp_path / "bars.parquet"
    bars.to_parquet(path)
    chunk = next(LongTableSource(path).iter_chunks())
    assert "amount" in chunk.columns
    np.testing.assert_allclose(features_frame(chunk, "alpha158")["VWAP0"], 0.99, rtol=1e-6)
    bars.drop(columns="amount").assign(amount=-1.0).to_parquet(path)
    with pytest.raises(DataError, match="'amount'.*>= 0"):
        LongTableSource(path)
