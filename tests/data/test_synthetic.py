"""Synthetic market: determinism, chunking, realism bands, the oracle, and learnability from past bars."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kurtosis

from fvae_dist.data.bars import BarSource, open_source
from fvae_dist.data.synthetic import SyntheticMarket, SyntheticSource, generate_market
from fvae_dist.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return generate_market(200, 700, seed=11)


@pytest.fixture(scope="module")
def bars(market) -> pd.DataFrame:
    frame = market.bars()
    close = frame.groupby("instrument", sort=False)["close"]
    frame["ret"] = close.pct_change()
    frame["label"] = close.shift(-2) / close.shift(-1) - 1  # y_t = close[t+2]/close[t+1] - 1
    return frame


def daily_rank_ic(frame: pd.DataFrame, score: str, target: str = "label") -> pd.Series:
    frame = frame.dropna(subset=[score, target])
    return frame.groupby("date").apply(lambda day: day[score].corr(day[target], method="spearman"))


def test_is_a_bar_source_with_the_promised_layout(market, bars):
    assert isinstance(market, BarSource) and SyntheticSource is SyntheticMarket
    assert market.name == "synthetic(stocks=200,days=700,seed=11,k=3,start=2015-01-05)"
    assert len(market.calendar) == 700 and market.calendar.dtype == np.dtype("datetime64[D]")
    assert len(market.instruments) == 200 and market.instruments == sorted(market.instruments)
    assert list(bars.columns[:8]) == ["date", "instrument", "open", "high", "low", "close", "volume", "factor"]
    assert bars["date"].dtype == np.dtype("datetime64[ns]")
    assert bars.equals(bars.sort_values(["instrument", "date"]).reset_index(drop=True))
    assert (bars["factor"] == 1.0).all()
    assert (bars["low"] > 0).all()
    assert (bars["low"] <= bars[["open", "close"]].min(axis=1)).all()
    assert (bars["high"] >= bars[["open", "close"]].max(axis=1)).all()
    assert (bars["volume"] > 0).all()
    assert market.factor_returns().shape == (700, 3)


def test_listing_delisting_and_suspensions(market, bars):
    membership = market.membership
    assert list(membership.columns) == ["instrument", "start_date", "end_date"]
    first, last = pd.Timestamp(market.calendar[0]), pd.Timestamp(market.calendar[-1])
    assert (membership["start_date"] > first).sum() > 10  # late listings
    assert (membership["end_date"] < last).sum() > 3  # delistings
    span = bars.groupby("instrument")["date"].agg(["min", "max", "size"])
    joined = span.join(membership.set_index("instrument"))
    assert (joined["min"] == joined["start_date"]).all() and (joined["max"] == joined["end_date"]).all()
    days_listed = [np.searchsorted(market.calendar, e) - np.searchsorted(market.calendar, s) + 1
                   for s, e in zip(joined["start_date"].to_numpy("datetime64[D]"), joined["end_date"].to_numpy("datetime64[D]"))]
    assert (joined["size"] <= days_listed).all() and (joined["size"] < days_listed).any()  # suspended days


def test_same_seed_same_market_other_seed_other_market():
    a = generate_market(30, 120, seed=5).bars()
    b = generate_market(30, 120, seed=5).bars()
    c = generate_market(30, 120, seed=6).bars()
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["close"].iloc[:50], c["close"].iloc[:50])
    assert generate_market(30, 120, seed=5).fingerprint() != generate_market(30, 120, seed=6).fingerprint()


def test_chunked_generation_equals_whole_generation():
    market = generate_market(45, 150, seed=2)
    whole = pd.concat(list(market.iter_chunks(instruments_per_chunk=45)), ignore_index=True)
    chunks = list(market.iter_chunks(instruments_per_chunk=7))
    assert len(chunks) == 7
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True), whole)
    # a stock's bars do not depend on how many stocks the market has
    smaller = generate_market(10, 150, seed=2).bars()
    pd.testing.assert_frame_equal(smaller, whole[whole["instrument"].isin(smaller["instrument"].unique())].reset_index(drop=True))
    window = pd.concat(list(market.iter_chunks(10, start=market.calendar[20], end=market.calendar[40])), ignore_index=True)
    expected = whole[(whole["date"] >= pd.Timestamp(market.calendar[20])) & (whole["date"] <= pd.Timestamp(market.calendar[40]))]
    pd.testing.assert_frame_equal(window, expected.reset_index(drop=True))
    with pytest.raises(DataError, match="no trading days"):
        next(market.iter_chunks(start="2040-01-01"))


def test_return_distribution_is_realistic(bars):
    returns = bars["ret"].dropna()
    assert 0.015 < returns.std() < 0.03  # daily sd about 2%
    assert 2 < kurtosis(returns) < 40  # fat tails (normal: 0)
    cross_section_sd = bars.groupby("date")["ret"].std().mean()
    assert 0.01 < cross_section_sd < returns.std()  # a common component exists


def test_oracle_rank_ic_is_small_but_clearly_positive(market, bars):
    oracle = market.true_expected_returns(bars)
    assert len(oracle) == len(bars)
    assert (oracle["instrument"].to_numpy() == bars["instrument"].to_numpy()).all()
    scored = bars.assign(oracle=oracle["expected_return"].to_numpy())
    ic = daily_rank_ic(scored, "oracle")
    assert 0.05 < ic.mean() < 0.2
    assert (ic > 0).mean() > 0.6  # factor shocks make daily ICs noisy, as in real markets
    by_codes = market.true_expected_returns(market.instruments[:3])
    assert list(by_codes.columns) == ["date", "instrument", "expected_return"]
    assert len(by_codes) == (bars["instrument"].isin(market.instruments[:3])).sum()


def test_ridge_on_simple_lagged_features_learns_something(bars):
    """Fit on the first half, score the second: the signal must be visible in past bars."""
    frame = bars.copy()
    by_stock = frame.groupby("instrument", sort=False)
    frame["ret5"] = frame["close"] / by_stock["close"].shift(5) - 1
    frame["ret20"] = frame["close"] / by_stock["close"].shift(20) - 1
    frame["ret60"] = frame["close"] / by_stock["close"].shift(60) - 1
    frame["vol5"] = by_stock["ret"].rolling(5).std().reset_index(level=0, drop=True)
    frame["vol20"] = by_stock["ret"].rolling(20).std().reset_index(level=0, drop=True)
    mean_volume = by_stock["volume"].rolling(20).mean().reset_index(level=0, drop=True)
    frame["volume_ratio"] = np.log(frame["volume"] / mean_volume)
    features = ["ret", "ret5", "ret20", "ret60", "vol5", "vol20", "volume_ratio"]
    frame = frame.dropna(subset=[*features, "label"])
    for column in [*features, "label"]:  # cross-sectional ranks, as Qlib's CSRankNorm
        frame[column] = frame.groupby("date")[column].rank(pct=True) - 0.5
    days = np.sort(frame["date"].unique())
    train = frame[frame["date"] < days[len(days) // 2]]
    test = frame[frame["date"] > days[len(days) // 2 + 2]]  # the label spans 2 days: leave a gap
    x, y = train[features].to_numpy(), train["label"].to_numpy()
    weights = np.linalg.solve(x.T @ x + np.eye(len(features)), x.T @ y)
    ic = daily_rank_ic(test.assign(pred=test[features].to_numpy() @ weights), "pred")
    print(f"ridge out-of-sample mean daily Rank IC {ic.mean():.4f} over {len(ic)} days")
    assert ic.mean() > 0.01
    assert ic.mean() > 2 * ic.std() / np.sqrt(len(ic))  # clearly above noise


def test_open_source_specs():
    market = open_source("synthetic:stocks=20,days=50,seed=4,k=2,start=2018-06-01")
    assert isinstance(market, SyntheticMarket)
    assert (market.n_stocks, market.n_days, market.seed, market.n_factors) == (20, 50, 4, 2)
    assert str(market.calendar[0]) == "2018-06-01"
    default = open_source("synthetic")
    assert (default.n_stocks, default.n_days, default.seed) == (300, 1000, 0)
    with pytest.raises(ConfigError, match="'stock=20' is not a setting"):
        open_source("synthetic:stock=20")
    with pytest.raises(ConfigError, match="days='many'"):
        open_source("synthetic:days=many")
    with pytest.raises(ConfigError, match="stocks=0"):
        open_source("synthetic:stocks=0")
    with pytest.raises(ConfigError, match="unknown instruments"):
        market.true_expected_returns(["NOPE"])
