"""TopK-Drop backtest: hand-checked accounting, A-share rules, bad input, and a real-data sanity check."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fvae_dist.commands import backtest as backtest_command
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.backtest import (
    BacktestConfig,
    limit_thresholds,
    risk_analysis,
    run_backtest,
    topk_drop_decision,
)
from fvae_dist.evaluate.metrics import realised_label

DATES = pd.bdate_range("2021-01-04", periods=6)  # Mon 4th .. Mon 11th
A, B, C, D = "SH600001", "SH600002", "SH600003", "SH600004"


# ----------------------------------------------------------------------------- the decision rule


def test_topk_drop_decision_follows_qlib_semantics():
    #            0    1    2    3    4       5
    score = np.array([0.9, 0.1, 0.8, 0.7, np.nan, 0.95])
    # empty book: buy the best k
    sell, buy = topk_drop_decision(score, np.array([], dtype=int), topk=3, n_drop=1)
    assert sell.tolist() == [] and buy.tolist() == [5, 0, 2]
    # held {0, 1, 2}: 1 is in the bottom n_drop of held + candidates -> swapped for 5
    sell, buy = topk_drop_decision(score, np.array([0, 1, 2]), topk=3, n_drop=1)
    assert sell.tolist() == [1] and buy.tolist() == [5]
    # a held stock without a score today ranks last and goes first; at most n_drop replaced
    sell, buy = topk_drop_decision(score, np.array([0, 1, 4]), topk=3, n_drop=2)
    assert sell.tolist() == [1, 4] and buy.tolist() == [5, 2]
    # nothing better outside: the candidate itself is in the bottom, so no trade
    sell, buy = topk_drop_decision(np.array([0.9, 0.8, 0.1]), np.array([0, 1]), topk=2, n_drop=1)
    assert sell.tolist() == [] and buy.tolist() == []
    # n_drop = 0 never sells (Qlib's list(l)[-0:] would select everything)
    sell, buy = topk_drop_decision(score, np.array([0, 1, 2]), topk=3, n_drop=0)
    assert sell.tolist() == [] and buy.tolist() == []
    # ties break by instrument index, so results repeat
    sell, buy = topk_drop_decision(np.array([0.5, 0.5, 0.5, 0.5]), np.array([], dtype=int), topk=2, n_drop=1)
    assert buy.tolist() == [0, 1]


# ----------------------------------------------------------------------------- hand-checked accounting


def test_holdings_returns_and_costs_by_hand(market_helpers):
    long_bars, benchmark_frame, predictions_frame = market_helpers
    bars = long_bars(
        DATES,
        {A: [10, 10, 11, 11, 11, 11], B: [20, 20, 20, 22, 22, 22], C: [5, 5, 5, 5.5, 5.5, 5.5], D: [8, 8, 8, 8, 8.8, 8.8]},
    )
    bench = benchmark_frame(DATES, [100, 100, 101, 101, 101, 101])
    predictions = predictions_frame(
        {
            DATES[0]: {A: 0.9, B: 0.8, C: 0.1, D: 0.0},
            DATES[1]: {A: 0.0, B: 0.8, C: 0.9, D: 0.1},
            DATES[2]: {A: 0.0, B: 0.8, C: 0.9, D: 1.0},
        }
    )
    config = BacktestConfig(topk=2, n_drop=1, buy_cost=0.001, sell_cost=0.002, min_cost=5, lot_size=0, capital=1e6)
    daily = run_backtest(predictions, bars, bench, config).daily.set_index("date")

    # signal of day t trades on t+1; the last day is two trading days after the last signal
    assert daily.index.tolist() == list(DATES[1:5])
    assert daily["holdings"].tolist() == [f"{A};{B}", f"{B};{C}", f"{C};{D}", f"{C};{D}"]

    # day 1: buy A and B with 95% of the cash, 0.1% fee each
    cash = 1e6 - 2 * 475_000 - 2 * 475.0
    value1 = cash + 47_500 * 10 + 23_750 * 20
    day1 = daily.loc[DATES[1]]
    assert day1["return"] == pytest.approx(0.0, abs=1e-12)
    assert day1["cost"] == pytest.approx(950 / 1e6)
    assert day1["turnover"] == pytest.approx(0.95)
    assert day1["value"] == pytest.approx(value1)
    # day 2: A rose 10% (+47,500); A sold at 11 (0.2% fee), C bought with 95% of the cash
    cash += 47_500 * 11 - 0.002 * 522_500
    c_value = 0.95 * cash
    cash -= c_value * 1.001
    value2 = cash + 23_750 * 20 + c_value
    day2 = daily.loc[DATES[2]]
    assert day2["return"] == pytest.approx(47_500 / value1)
    assert day2["cost"] == pytest.approx((1045 + 0.001 * c_value) / value1)
    assert day2["value"] == pytest.approx(value2)
    assert day2["bench"] == pytest.approx(0.01)
    assert day2["excess_with_cost"] == pytest.approx(day2["return"] - day2["cost"] - 0.01)
    # day 3: B +10%, C +10%; B sold, D bought
    gain3 = 23_750 * 2 + c_value * 0.1
    cash += 23_750 * 22 * (1 - 0.002)
    d_value = 0.95 * cash
    cash -= d_value * 1.001
    value3 = cash + c_value * 1.1 + d_value
    assert daily.loc[DATES[3], "return"] == pytest.approx(gain3 / value2)
    assert daily.loc[DATES[3], "value"] == pytest.approx(value3)
    # day 4: no signal dated day 3 -> no trade; D +10%
    assert daily.loc[DATES[4], "cost"] == 0 and daily.loc[DATES[4], "turnover"] == 0
    assert daily.loc[DATES[4], "return"] == pytest.approx(d_value * 0.1 / value3)


def test_lots_and_minimum_fee(market_helpers):
    long_bars, benchmark_frame, predictions_frame = market_helpers
    # A's factor 2: adjusted 10 = raw 5 CNY, so 4,750 CNY buys 950 raw shares -> 900 in lots
    bars = long_bars(DATES[:3], {A: [10, 10, 10], B: [20, 20, 20]}, factors={A: 2.0})
    bench = benchmark_frame(DATES[:3], [1, 1, 1])
    predictions = predictions_frame({DATES[0]: {A: 1.0, B: 0.5}})
    config = BacktestConfig(topk=2, n_drop=1, capital=10_000)
    daily = run_backtest(predictions, bars, bench, config).daily
    first = daily.iloc[0]
    bought = 450 * 10 + 200 * 20  # A: 900 raw shares = 450 adjusted; B: 200 shares
    assert first["turnover"] == pytest.approx(bought / 10_000)
    assert first["cost"] == pytest.approx(2 * 5 / 10_000)  # 0.05% of ~4,000 is < 5 CNY: the minimum applies
    assert first["cash"] == pytest.approx(10_000 - bought - 10)
    assert first["min_cost_trades"] == 2


# ----------------------------------------------------------------------------- A-share rules


def test_price_limits_and_suspensions_block_the_right_side(market_helpers):
    long_bars, benchmark_frame, predictions_frame = market_helpers
    dates = pd.bdate_range("2021-03-01", periods=6)
    E = "SZ300001"  # ChiNext: 20% limits after 2020-08-24
    bars = long_bars(
        dates,
        {
            A: [10, 10, 9.0, 9.0, 9.0, 9.0],  # day 2: -10% -> its sell is blocked
            B: [20, 20, 20, 20, 20, 20],  # day 4: no bar -> its sell is blocked
            C: [5, 5, 5, 5.5, 5.5, 5.5],  # day 2: suspended; day 3: +10% -> buy blocked
            E: [10, 10, 10, 10, 11.2, 11.2],  # day 4: +12% is inside its 20% limit
        },
        volumes={C: [1e6, 1e6, 0, 1e6, 1e6, 1e6]},
        missing={(B, 4)},
    )
    bench = benchmark_frame(dates, [1.0] * 6)
    predictions = predictions_frame(
        {
            dates[0]: {A: 0.9, B: 0.8, C: 0.1, E: 0.0},
            dates[1]: {A: 0.0, B: 0.8, C: 0.95, E: 0.1},  # sell A (down-limit), buy C (suspended)
            dates[2]: {A: 0.0, B: 0.8, C: 0.95, E: 0.1},  # sell A (ok now), buy C (up-limit)
            dates[3]: {A: 0.0, B: 0.1, C: 0.95, E: 0.9},  # sell B (no bar), buy C and E
        }
    )
    daily = run_backtest(predictions, bars, bench, BacktestConfig(topk=2, n_drop=1, lot_size=0)).daily.set_index("date")
    assert daily.loc[dates[2], ["blocked_sell_limit", "blocked_buy_suspended", "n_sold", "n_bought"]].tolist() == [1, 1, 0, 0]
    assert daily.loc[dates[2], "holdings"] == f"{A};{B}"
    assert daily.loc[dates[3], ["blocked_buy_limit", "n_sold", "n_bought"]].tolist() == [1, 1, 0]
    assert daily.loc[dates[3], "holdings"] == B
    # B cannot be sold without a bar, E's +12% is tradable: the book briefly holds three stocks
    assert daily.loc[dates[4], ["blocked_sell_suspended", "n_sold", "n_bought"]].tolist() == [1, 0, 2]
    assert daily.loc[dates[4], "holdings"] == f"{B};{C};{E}"
    # a stock without a bar keeps its last close: B's value is unchanged on day 4
    assert daily.loc[dates[4], "return"] == pytest.approx(0.0, abs=1e-12)


def test_limit_thresholds_by_board_and_date():
    dates = pd.DatetimeIndex(["2020-08-21", "2020-08-24"])
    table = limit_thresholds(np.array(["SH600000", "SZ300750", "SZ301001", "SH688001", "SZ000001"]), dates, BacktestConfig())
    assert table[0].tolist() == [0.095, 0.095, 0.095, 0.195, 0.095]
    assert table[1].tolist() == [0.095, 0.195, 0.195, 0.195, 0.095]


def test_tdrisk_ranks_by_risk_adjusted_mean(market_helpers):
    long_bars, benchmark_frame, predictions_frame = market_helpers
    bars = long_bars(DATES[:3], {A: [10] * 3, B: [10] * 3, C: [10] * 3})
    bench = benchmark_frame(DATES[:3], [1, 1, 1])
    predictions = predictions_frame({DATES[0]: {A: 0.9, B: 0.8, C: 0.1}})
    predictions["sigma"] = [1.0, 0.1, 0.1]  # A: 0.9 - 0.5 = 0.4 < B: 0.75, C: 0.05
    plain = run_backtest(predictions, bars, bench, BacktestConfig(topk=1, n_drop=1)).daily
    risky = run_backtest(predictions, bars, bench, BacktestConfig(topk=1, n_drop=1, strategy="tdrisk", eta=0.5)).daily
    assert plain["holdings"].iloc[0] == A and risky["holdings"].iloc[0] == B


# ----------------------------------------------------------------------------- metrics


def test_risk_analysis_sum_and_product_conventions():
    r = pd.Series([0.01, -0.02, 0.005, 0.03, -0.01])
    total = risk_analysis(r, "sum", 238)
    assert total["annualized_return"] == pytest.approx(r.mean() * 238)
    assert total["information_ratio"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(238))
    assert total["max_drawdown"] == pytest.approx(-0.02)  # cumsum 0.01 -> -0.01
    compounded = risk_analysis(r, "product", 238)
    growth = float(np.prod(1 + r.to_numpy()))
    assert compounded["annualized_return"] == pytest.approx(growth ** (238 / 5) - 1)
    assert compounded["max_drawdown"] == pytest.approx(1.01 * 0.98 / 1.01 - 1)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def small_case(market_helpers):
    long_bars, benchmark_frame, predictions_frame = market_helpers
    bars = long_bars(DATES, {A: [10] * 6, B: [20] * 6})
    bench = benchmark_frame(DATES, [1.0] * 6)
    predictions = predictions_frame({DATES[0]: {A: 0.5, B: 0.1}, DATES[1]: {A: 0.5, B: 0.1}})
    return predictions, bars, bench


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p, b, i: (pd.concat([p, p.iloc[:1].assign(instrument="SH699999")]), b, i), "no bars.*SH699999"),
        (lambda p, b, i: (p.assign(date=p["date"] + pd.Timedelta(days=40)), b, i), "not trading days"),
        (lambda p, b, i: (pd.concat([p, p.iloc[:1]]), b, i), "share a \\(date, instrument\\) key"),
        (lambda p, b, i: (p.assign(mu=[np.nan, 0.1, 0.5, 0.1]), b, i), "NaN.*--drop-nan-scores"),
        (lambda p, b, i: (p, b, i.assign(instrument="SH000905")), "'SH000300' not found"),
        (lambda p, b, i: (p, b, i.iloc[[0, 1, 3, 4, 5]]), "no close on 1 backtest day"),
        (lambda p, b, i: (p.drop(columns=["mu"]), b, i), "missing column.*mu"),
    ],
)
def test_bad_input_raises_a_clear_data_error(small_case, mutate, message):
    predictions, bars, bench = mutate(*small_case)
    with pytest.raises(DataError, match=message):
        run_backtest(predictions, bars, bench, BacktestConfig(topk=1, n_drop=1))


def test_nan_scores_are_dropped_only_on_request(small_case):
    predictions, bars, bench = small_case
    predictions = predictions.assign(mu=[np.nan, 0.1, 0.5, 0.1])
    daily = run_backtest(predictions, bars, bench, BacktestConfig(topk=1, n_drop=1, drop_nan_scores=True)).daily
    assert daily["holdings"].iloc[0] == B  # A had no score on the first day


def test_bad_settings_raise_config_error(small_case):
    with pytest.raises(ConfigError, match="n_drop"):
        run_backtest(*small_case, BacktestConfig(topk=2, n_drop=3))
    with pytest.raises(ConfigError, match="strategy"):
        run_backtest(*small_case, BacktestConfig(strategy="long_short"))


def test_backtest_command_writes_daily_and_summary(tmp_path, small_case, run_command, capsys):
    predictions, bars, bench = small_case
    paths = {name: tmp_path / f"{name}.parquet" for name in ("predictions", "bars", "bench")}
    predictions.to_parquet(paths["predictions"])
    bars.to_parquet(paths["bars"])
    bench.to_parquet(paths["bench"])
    argv = ["backtest", "--predictions", str(paths["predictions"]), "--bars", str(paths["bars"]),
            "--benchmark", str(paths["bench"]), "--topk", "1", "--n-drop", "1", "--strategy", "both",
            "--out", str(tmp_path / "bt")]
    assert run_command(backtest_command, argv) == 0
    assert "excess_return_with_cost" in capsys.readouterr().out
    for strategy in ("topk_drop", "tdrisk"):
        summary = json.loads((tmp_path / "bt" / f"{strategy}_summary.json").read_text())
        daily = pd.read_csv(tmp_path / "bt" / f"{strategy}_daily.csv")
        assert summary["strategy"] == strategy and summary["n_days"] == len(daily) == 3
    with pytest.raises(DataError, match="SH000905"):
        run_command(backtest_command, argv[:-2] + ["--benchmark-code", "SH000905"])


# ----------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_perfect_foresight_beats_random_on_csi300(csi300_dir):
    from fvae_dist.evaluate.backtest import load_bars, load_benchmark

    bars = load_bars(csi300_dir / "stocks_daily.parquet", start="2018-12-01", end="2020-12-31")
    bench = load_benchmark(csi300_dir / "index_daily.parquet", "SH000300")
    members = pd.read_csv(csi300_dir / "csi300_membership.csv", parse_dates=["start_date", "end_date"])
    label = realised_label(bars)
    label = label[(label["date"] >= "2019-01-01") & (label["date"] <= "2020-12-31")]
    universe = label.merge(members, on="instrument")
    universe = universe[(universe["date"] >= universe["start_date"]) & (universe["date"] <= universe["end_date"])]
    universe = universe.drop_duplicates(["date", "instrument"])[["date", "instrument", "label"]]
    oracle = universe.assign(mu=universe["label"], sigma=0.0)
    noise = universe.assign(mu=np.random.default_rng(0).standard_normal(len(universe)), sigma=0.0)

    perfect = run_backtest(oracle, bars, bench).summary["excess_return_with_cost"]["sum"]
    random = run_backtest(noise, bars, bench).summary["excess_return_with_cost"]["sum"]
    # knowing tomorrow's return, even 5 swaps a day earn far more than costs
    assert perfect["annualized_return"] > 1.0 and perfect["information_ratio"] > 10
    assert abs(random["annualized_return"]) < 0.3 and abs(random["information_ratio"]) < 2.5
    assert perfect["annualized_return"] - random["annualized_return"] > 1.0
