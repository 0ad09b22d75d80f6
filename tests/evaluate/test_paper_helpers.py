"""evaluate/universe.py, evaluate/ensemble.py, evaluate/risk_aversion.py: the pieces the paper's
tables add on top of the metrics and the backtest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.backtest import BacktestConfig
from fvae_dist.evaluate.ensemble import seed_ensemble
from fvae_dist.evaluate.risk_aversion import choose_eta
from fvae_dist.evaluate.universe import restrict_to_members


def test_members_are_point_in_time_with_several_intervals():
    membership = pd.DataFrame({"instrument": ["A", "A", "B"],
                               "start_date": pd.to_datetime(["2020-01-01", "2020-03-01", "2020-02-01"]),
                               "end_date": pd.to_datetime(["2020-01-31", "2020-03-31", "2020-12-31"])})
    dates = pd.to_datetime(["2020-01-15", "2020-02-15", "2020-03-15", "2020-02-15", "2020-01-15", "2020-02-15"])
    predictions = pd.DataFrame({"date": dates, "instrument": ["A", "A", "A", "B", "B", "C"], "mu": range(6)})
    kept = restrict_to_members(predictions, membership)
    assert kept["mu"].tolist() == [0, 2, 3]          # A out in February, B in from February, C never


def test_seed_ensemble_averages_mu_and_mixes_sigma():
    keys = {"date": pd.to_datetime(["2020-01-02"] * 3), "instrument": ["A", "B", "C"]}
    a = pd.DataFrame({**keys, "mu": [1.0, 2.0, 3.0], "sigma": [1.0, 1.0, 2.0], "label": [0.1, 0.2, 0.3]})
    b = pd.DataFrame({**keys, "mu": [3.0, 2.0, 1.0], "sigma": [1.0, 3.0, 2.0], "label": [0.1, 0.2, 0.3]})
    ens = seed_ensemble([a, b.iloc[:2]])             # C only in one run: left out
    assert ens["instrument"].tolist() == ["A", "B"]
    np.testing.assert_allclose(ens["mu"], [2.0, 2.0])
    np.testing.assert_allclose(ens["sigma"], [np.sqrt(1 + 1), np.sqrt(5 + 0)])
    assert ens["label"].tolist() == [0.1, 0.2]
    no_sigma = seed_ensemble([a.drop(columns="sigma"), b])
    assert no_sigma["sigma"].isna().all()
    with pytest.raises(DataError, match="at least 2 runs"):
        seed_ensemble([a])


def test_eta_is_chosen_by_validation_information_ratio(market_helpers):
    """Two stocks: the steady one earns, the volatile one loses; mu prefers the volatile one, so
    only a risk-averse ranking buys the steady one and beats the benchmark."""
    long_bars, benchmark_frame, _ = market_helpers
    dates = pd.bdate_range("2020-01-01", periods=40)
    rng = np.random.default_rng(0)
    steady = 10 * np.cumprod(1 + 0.004 + 0.001 * rng.standard_normal(40))
    volatile = 10 * np.cumprod(1 - 0.004 + 0.03 * rng.standard_normal(40))
    bars = long_bars(dates, {"S": steady, "V": volatile})
    bench = benchmark_frame(dates, np.full(40, 100.0))
    predictions = pd.DataFrame([{"date": d, "instrument": code, "mu": mu, "sigma": sigma}
                                for d in dates[:-2] for code, mu, sigma in (("S", 0.0, 0.1), ("V", 0.1, 1.0))])
    config = BacktestConfig(topk=1, n_drop=1, lot_size=0, min_cost=0.0)
    choice = choose_eta(predictions, bars, bench, etas=[0.0, 0.05, 1.0], config=config, benchmark_code="SH000300")
    assert choice.eta == 1.0                          # mu - 1.0 * sigma ranks S first
    assert list(choice.candidates["eta"]) == [0.0, 0.05, 1.0]
    assert choice.candidates.set_index("eta").loc[0.0, "information_ratio"] < choice.criterion
    with pytest.raises(ConfigError, match="eta candidates"):
        choose_eta(predictions, bars, bench, etas=[-1.0], config=config)
