"""Alpha158 features and LABEL0: hand-checked windows, a slow Qlib-semantics oracle, and Qlib's own values."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fvae_dist.data.features import (
    ALPHA158_20,
    FEATURE_SETS,
    LABEL_NAME,
    PricePanel,
    compute_features,
    compute_label,
    features_frame,
    panel_from_bars,
)
from fvae_dist.errors import ConfigError, DataError
from tests.conftest import REFERENCE_DIR

REFERENCE = REFERENCE_DIR / "alpha158_20_qlib.parquet"
ATOL, RTOL = 1e-5, 1e-4


def bars_of(close, volume=None, instrument="SH600000", start="2021-01-04", spread=0.02):
    close = np.asarray(close, dtype=float)
    volume = np.full(len(close), 1e6) if volume is None else np.asarray(volume, dtype=float)
    return pd.DataFrame(
        {
            "date": pd.bdate_range(start, periods=len(close)),
            "instrument": instrument,
            "open": close * (1 - spread / 2),
            "high": close * (1 + spread),
            "low": close * (1 - spread),
            "close": close,
            "volume": volume,
        }
    )


def one(bars, name):
    """The feature's values for a single-instrument frame, as float64."""
    return features_frame(bars)[name].to_numpy(dtype=np.float64)


def assert_close_like_qlib(ours, theirs, label=""):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    nan_ours, nan_theirs = np.isnan(ours), np.isnan(theirs)
    mismatch = np.flatnonzero(nan_ours != nan_theirs)
    assert mismatch.size == 0, f"{label}: NaN pattern differs at {mismatch[:5]} (ours {ours[mismatch[:5]]}, expected {theirs[mismatch[:5]]})"
    err = np.abs(np.where(nan_ours, 0, ours - theirs))
    bad = np.flatnonzero((err > ATOL) & (err > RTOL * np.abs(np.nan_to_num(theirs))))
    assert bad.size == 0, f"{label}: {bad.size} values off, first at {bad[:5]}: ours {ours[bad[:5]]}, expected {theirs[bad[:5]]}"


# --------------------------------------------------------------------------- hand-checked windows

CLOSE6 = [10.0, 10.5, 10.2, 10.9, 11.4, 11.1]
VOLUME6 = [1000.0, 1500.0, 900.0, 2000.0, 2500.0, 1200.0]


def test_regression_and_correlation_windows_match_polyfit_and_corrcoef():
    bars = bars_of(CLOSE6, VOLUME6)
    frame = features_frame(bars)
    close, logv = np.array(CLOSE6), np.log(np.array(VOLUME6) + 1)
    for day, size in ((5, 5), (2, 3)):                       # a full window, and a partial one (min_periods=1)
        y, x = close[day - size + 1: day + 1], np.arange(size, dtype=float)
        slope, intercept = np.polyfit(x, y, 1)
        assert frame["RSQR5"][day] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-5)
        assert frame["RESI5"][day] == pytest.approx((y[-1] - (slope * x[-1] + intercept)) / y[-1], abs=1e-7)
        assert frame["STD5"][day] == pytest.approx(np.std(y, ddof=1) / y[-1], rel=1e-5)
        assert frame["CORR5"][day] == pytest.approx(np.corrcoef(y, logv[day - size + 1: day + 1])[0, 1], rel=1e-5)
        assert frame["VSTD5"][day] == pytest.approx(np.std(VOLUME6[day - size + 1: day + 1], ddof=1) / VOLUME6[day], rel=1e-5)
    ret = close[1:] / close[:-1]
    dlogv = np.log(np.array(VOLUME6[1:]) / np.array(VOLUME6[:-1]) + 1)
    assert frame["CORD5"][5] == pytest.approx(np.corrcoef(ret[-5:], dlogv[-5:])[0, 1], rel=1e-5)
    wv = np.abs(ret - 1) * np.array(VOLUME6[1:])
    assert frame["WVMA5"][5] == pytest.approx(np.std(wv, ddof=1) / np.mean(wv), rel=1e-5)
    # one value: no std, no line, no correlation
    first = frame.iloc[0]
    assert np.isnan([first["STD5"], first["RSQR5"], first["RESI5"], first["CORR5"], first["VSTD5"]]).all()


def test_kbar_roc_and_label():
    close = np.linspace(10, 12, 70)
    frame = features_frame(bars_of(close))
    np.testing.assert_allclose(frame["KLEN"], 0.04 / 0.99, rtol=1e-5)                 # (high-low)/open
    np.testing.assert_allclose(frame["KLOW"], 0.01 / 0.99, rtol=1e-5)                 # (min(open,close)-low)/open
    assert np.isnan(frame["ROC60"][:60]).all()
    assert frame["ROC60"][65] == pytest.approx(close[5] / close[65], rel=1e-6)
    assert frame[LABEL_NAME][3] == pytest.approx(close[5] / close[4] - 1, abs=1.2e-7)   # float32, as Qlib
    assert np.isnan(frame[LABEL_NAME][-2:]).all() and not np.isnan(frame[LABEL_NAME][:-2]).any()


def test_a_missing_day_keeps_its_place_on_the_time_axis():
    close = [10.0, 10.4, np.nan, 10.1, 10.8]
    frame = features_frame(bars_of(close))
    x, y = np.array([0.0, 1.0, 3.0, 4.0]), np.array([10.0, 10.4, 10.1, 10.8])   # the gap is position 2
    slope, intercept = np.polyfit(x, y, 1)
    assert frame["RSQR5"][4] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-5)
    assert frame["RESI5"][4] == pytest.approx((10.8 - (4 * slope + intercept)) / 10.8, abs=1e-7)
    assert np.isnan(frame["RESI5"][2]) and not np.isnan(frame["RSQR5"][2])        # no close that day


def test_flat_windows_of_a_suspension():
    close = [10.0, 10.3, 10.1, 10.1, 10.1, 10.1, 10.1, 10.1]
    volume = [900.0, 1100.0, 0, 0, 0, 0, 0, 0]
    frame = features_frame(bars_of(close, volume))
    last = frame.iloc[-1]
    assert np.isnan(last["RSQR5"]) and np.isnan(last["CORR5"]) and np.isnan(last["CORD5"])  # flat input: NaN
    assert last["STD5"] == 0 and last["RESI5"] == pytest.approx(0, abs=1e-9)
    assert last["VSTD5"] == 0 and last["WVMA5"] == 0                                 # 0/(0+1e-12)
    # one traded day in the window and a zero volume today: a huge but finite ratio, like Qlib's
    assert frame["VSTD5"][5] == pytest.approx(np.std([1100, 0, 0, 0, 0], ddof=1) / 1e-12, rel=1e-5)


def test_an_infinite_volume_ratio_is_left_out_of_the_correlation():
    close = [10.0, 10.2, 10.1, 10.4, 10.3, 10.6, 10.5]
    volume = [800.0, 0.0, 900.0, 1000.0, 700.0, 1200.0, 1100.0]    # 900/0 -> inf on day 2
    frame = features_frame(bars_of(close, volume))
    ret = np.array(close[1:]) / np.array(close[:-1])
    with np.errstate(divide="ignore"):
        dlogv = np.log(np.array(volume[1:]) / np.array(volume[:-1]) + 1)
    keep = np.isfinite(dlogv)[-5:]
    expected = np.corrcoef(ret[-5:][keep], dlogv[-5:][keep])[0, 1]
    assert frame["CORD5"].iloc[-1] == pytest.approx(expected, rel=1e-5)


def test_a_window_of_zeros_after_trading_keeps_pandas_leftover_like_qlib():
    # Qlib's Std is pandas' rolling std; depending on the history, pandas (>= 3) leaves a rounding residue
    # for a window of zeros, and VSTD5 divides it by 1e-12 (these volumes come from SH600008 in 2013).
    volume = [1432144.75, 599714.75, 0.0, 150622.25, 544533.5, 163481.25, 148715.71875, 888149.5625,
              26235.3515625, 0, 0, 0, 0, 0]
    frame = features_frame(bars_of(np.full(len(volume), 10.0), volume))
    pandas_std = pd.Series(volume).rolling(5, min_periods=1).std().to_numpy()
    assert frame["VSTD5"].iloc[-1] == pytest.approx(pandas_std[-1] / 1e-12, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- rows, panel and API

def test_rows_follow_each_instruments_life_on_the_calendar():
    a = bars_of(np.linspace(10, 11, 8), instrument="SZ000002")
    b = bars_of(np.linspace(20, 21, 5), instrument="SH600001", start="2021-01-06")
    a = a.drop(index=4)                                            # a day without a bar inside a's life
    b = b.iloc[:4]                                                 # b delists early
    frame = features_frame(pd.concat([a, b]))
    assert list(frame.columns) == ["date", "instrument", *ALPHA158_20, LABEL_NAME]
    assert list(frame["instrument"].unique()) == ["SH600001", "SZ000002"]
    assert frame.groupby("instrument").size().to_dict() == {"SH600001": 4, "SZ000002": 8}
    assert frame.equals(frame.sort_values(["instrument", "date"]))
    gap = frame[(frame["instrument"] == "SZ000002") & (frame["date"] == a["date"].iloc[0] + pd.offsets.BDay(4))]
    assert len(gap) == 1 and np.isnan(gap["KLEN"].iloc[0])          # the missing day is a NaN row
    assert frame.groupby("instrument")[LABEL_NAME].apply(lambda s: s.isna().tail(2).all()).all()


def test_panel_api_matches_the_frame_and_blanks_days_outside_each_life():
    a = bars_of(np.linspace(10, 12, 30), instrument="A")
    b = bars_of(np.linspace(5, 4, 20), instrument="B", start="2021-01-11")
    bars = pd.concat([a, b])
    panel = panel_from_bars(bars)
    assert isinstance(panel, PricePanel) and panel.close.shape == (30, 2)
    assert panel.dates.dtype == np.dtype("datetime64[D]") and list(panel.instruments) == ["A", "B"]
    values = compute_features(panel, ("RSQR10", "WVMA5"))
    assert set(values) == {"RSQR10", "WVMA5"} and values["RSQR10"].dtype == np.float32
    frame = features_frame(bars)
    b_rows = frame["instrument"] == "B"
    np.testing.assert_array_equal(values["RSQR10"][5:25, 1], frame.loc[b_rows, "RSQR10"])
    assert np.isnan(values["RSQR10"][:5, 1]).all() and np.isnan(values["WVMA5"][25:, 1]).all()
    label = compute_label(panel)
    np.testing.assert_array_equal(label[:, 0], frame.loc[~b_rows, LABEL_NAME])
    assert np.isnan(label[:5, 1]).all()                             # not a day before B lists


def test_any_subset_of_instruments_gives_the_same_values():
    rng = np.random.default_rng(3)
    frames = [bars_of(10 * np.exp(np.cumsum(rng.normal(0, 0.02, 90))), rng.integers(0, 5000, 90),
                      instrument=f"SH6{i:05d}") for i in range(40)]           # more than one internal chunk
    panel = panel_from_bars(pd.concat(frames))
    whole = compute_features(panel)
    part = PricePanel(panel.dates, panel.instruments[7:33],
                      *(getattr(panel, f)[:, 7:33] for f in ("open", "high", "low", "close", "volume")))
    for name, values in compute_features(part).items():
        np.testing.assert_array_equal(values, whole[name][:, 7:33], err_msg=name)


def test_unknown_names_and_bad_bars_are_reported():
    bars = bars_of(CLOSE6)
    with pytest.raises(ConfigError, match="RSQR7.*known:.*RSQR5"):
        compute_features(panel_from_bars(bars), ("KLEN", "RSQR7"))
    with pytest.raises(ConfigError, match="alpha999"):
        features_frame(bars, feature_set="alpha999")
    assert FEATURE_SETS["alpha158_20"] == ALPHA158_20 and len(ALPHA158_20) == 20
    with pytest.raises(DataError, match="volume"):
        panel_from_bars(bars.drop(columns="volume"))
    with pytest.raises(DataError, match="one per"):
        panel_from_bars(pd.concat([bars, bars.iloc[[2]]]))
    with pytest.raises(DataError, match="calendar"):
        panel_from_bars(bars, calendar=bars["date"].iloc[1:])


# --------------------------------------------------------------------------- a slow oracle of Qlib's semantics

def qlib_oracle(bars: pd.DataFrame) -> pd.DataFrame:
    """Qlib's expressions for one instrument, evaluated the slow way: float32 element-wise, pandas rolling
    ops, and a least-squares fit per window for Rsquare/Resi."""
    f = {k: pd.Series(bars[k].to_numpy(np.float32)) for k in ("open", "high", "low", "close", "volume")}
    c, v = f["close"], f["volume"]

    def flat(x, n):
        return np.isclose(x.rolling(n, min_periods=1).std(), 0, atol=2e-5)

    def corr(a, b, n):
        r = a.rolling(n, min_periods=1).corr(b)
        r[flat(a, n) | flat(b, n)] = np.nan
        return r

    def line(n, want):
        out = np.full(len(c), np.nan)
        y_all = c.to_numpy(np.float64)
        for t in range(len(c)):
            y = y_all[max(0, t - n + 1): t + 1]
            x = np.arange(n - len(y), n, dtype=float)
            ok = ~np.isnan(y)
            if ok.sum() < 2:
                continue
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
            out[t] = np.corrcoef(x[ok], y[ok])[0, 1] ** 2 if want == "r2" else y[-1] - (slope * x[-1] + intercept)
        return pd.Series(out)

    ret = c / c.shift(1)
    dlogv = np.log(v / v.shift(1) + np.float32(1))
    wv = np.abs(ret - np.float32(1)) * v
    out = {
        "KLEN": (f["high"] - f["low"]) / f["open"],
        "KLOW": (np.minimum(f["open"], c) - f["low"]) / f["open"],
        "ROC60": c.shift(60) / c,
        "STD5": c.rolling(5, min_periods=1).std() / c,
        "VSTD5": v.rolling(5, min_periods=1).std() / (v + np.float32(1e-12)),
        LABEL_NAME: c.shift(-2) / c.shift(-1) - np.float32(1),
    }
    for n in (5, 10, 20, 60):
        r2 = line(n, "r2")
        r2[flat(c, n)] = np.nan
        out[f"RSQR{n}"] = r2
        out[f"CORR{n}"] = corr(c, np.log(v + np.float32(1)), n)
    for n in (5, 10):
        out[f"RESI{n}"] = line(n, "resi") / c
    for n in (5, 10, 60):
        out[f"CORD{n}"] = corr(ret, dlogv, n)
    for n in (5, 60):
        out[f"WVMA{n}"] = wv.rolling(n, min_periods=1).std() / (wv.rolling(n, min_periods=1).mean() + 1e-12)
    return pd.DataFrame(out)


def synthetic_market(seed=11, n_days=160):
    """Tick-rounded random walks with suspensions (volume 0, price carried, once nudged by a rounding-size
    amount), near-constant volumes (where float32 logs matter), gaps and a late listing."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, (start, length) in enumerate([(0, n_days), (0, n_days), (37, n_days - 37)]):
        close = np.round(20 * np.exp(np.cumsum(rng.normal(0, 0.02, length))), 2) * (1.7 + i)  # adjusted price
        volume = rng.integers(100, 50_000, length).astype(float) * 100
        stop = rng.integers(10, length - 45)
        close[stop: stop + 12] = close[stop - 1]
        close[stop + 6: stop + 12] += 1e-5              # std ~5e-6: Qlib's 2e-5 threshold blanks these windows
        volume[stop: stop + 12] = 0
        volume[stop + 14: stop + 30] = 3_000_000 + rng.integers(0, 3_000, 16)
        volume[stop + 33] = np.nan
        frame = bars_of(close, volume, instrument=f"SZ00000{i}", start=pd.bdate_range("2021-01-04", periods=n_days)[start])
        frames.append(frame.drop(index=length - 15) if i == 1 else frame)
    return pd.concat(frames, ignore_index=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the oracle's corrcoef of flat windows
def test_every_feature_matches_the_slow_oracle_on_a_market_with_suspensions_and_gaps():
    bars = synthetic_market()
    ours = features_frame(bars)
    for instrument, rows in ours.groupby("instrument"):
        mine = bars[bars["instrument"] == instrument].set_index("date").reindex(rows["date"]).reset_index()
        expected = qlib_oracle(mine)
        for name in (*ALPHA158_20, LABEL_NAME):
            assert_close_like_qlib(rows[name], expected[name], f"{instrument} {name}")


# --------------------------------------------------------------------------- Qlib's own numbers

@pytest.mark.real_data
def test_matches_qlibs_values_on_real_data(csi300_dir):
    if not REFERENCE.is_file():
        pytest.skip(f"Qlib reference values not found at {REFERENCE}")
    reference = pd.read_parquet(REFERENCE).sort_values(["instrument", "date"]).reset_index(drop=True)
    instruments = sorted(reference["instrument"].unique())
    bars = pd.read_parquet(csi300_dir / "stocks_daily.parquet", filters=[("instrument", "in", instruments)])
    calendar = pd.read_csv(csi300_dir / "calendar.csv").iloc[:, 0].to_numpy()
    ours = features_frame(bars, calendar=calendar)
    assert len(ours) == len(reference)
    np.testing.assert_array_equal(ours["instrument"].to_numpy(str), reference["instrument"].to_numpy(str))
    np.testing.assert_array_equal(ours["date"].to_numpy("datetime64[D]"), reference["date"].to_numpy("datetime64[D]"))
    for name in (*ALPHA158_20, LABEL_NAME):
        assert_close_like_qlib(ours[name], reference[name], name)
