"""TopK-Drop and TDrisk daily backtests on A-share bars, with Qlib's accounting conventions.

Timing (no look-ahead). A prediction dated t uses information up to the close of t. It is
traded on the next trading day t+1 of the bars' calendar, at the adjusted close of t+1 (Qlib's
default deal_price=close). A stock bought then earns close[t+2] / close[t+1] - 1 on day t+2,
which is exactly the label horizon y_t. Each day d of the backtest:
  1. holdings are marked from close[d-1] to close[d] (a stock without a usable bar keeps its
     last close, so it earns 0 that day);
  2. if a signal dated d-1 exists, the strategy picks sells and buys, sells execute first at
     close[d], then buys share the cash: each buy gets cash * risk_degree / len(buys);
  3. the account is valued at close[d].
The first day therefore only buys (return 0 before costs) and the last day, two trading days
after the last prediction, only earns.

Strategy (Qlib's TopkDropoutStrategy, method_sell="bottom", method_buy="top"): rank the day's
predicted stocks by score (TopK-Drop: mu; TDrisk: mu - eta * sigma). Candidates = the
best n_drop + k - len(held) stocks not held. Of held + candidates ranked together, the held
stocks among the bottom n_drop are sold (a held stock without a score that day ranks last);
the best len(sold) + k - len(held) candidates are bought. So at most n_drop stocks are replaced
a day, and the portfolio fills up to k on the first day. Bought stocks get equal cash; held
stocks are not rebalanced (as in Qlib). Ties break by instrument code, so runs are repeatable.

A-share rules. Cost = max(value * rate, min_cost) per trade: buy rate 0.05%, sell rate 0.15%
(stamp duty included), min_cost 5 CNY. Nothing trades in a suspended stock (no bar, NaN close,
or volume not > 0). A buy is blocked when the raw daily change close[d]/close[prev bar]-1
(adjusted prices give the raw change) is >= the limit threshold, a sell when it is <= -threshold:
9.5% by default (Qlib's), 19.5% for STAR (SH688/SH689) and for ChiNext (SZ300/SZ301) from
2020-08-24. (Qlib's strategy skips a stock at either limit in both directions; here only the
blocked direction is skipped.) ST stocks (5% limits) are not identifiable from the bars.
Buys are rounded down to lots of 100 raw shares (raw shares = adjusted amount * factor), from a
starting capital of 100,000,000 CNY. A blocked sell still frees its slot in the decision, so
the portfolio can briefly hold more than k stocks, as in Qlib.

Returns and metrics (Qlib's report and risk_analysis). The daily `return` excludes costs
((value change + cost) / previous value), `cost` and `turnover` (bought + sold value) are
fractions of the previous value, and `bench` is the benchmark's close-to-close return.
Excess return without cost = return - bench; with cost = return - cost - bench.
"sum" metrics (Qlib's default, as in the paper's Table 3): annualised return = mean * 238,
information ratio = mean / std(ddof=1) * sqrt(238), max drawdown = min of (cumsum - running max
of cumsum). "product" metrics compound: annualised return = prod(1+r)^(238/n) - 1, IR = geometric
mean / std of log(1+r) * sqrt(238), max drawdown on the compounded curve (Qlib's mode="product").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.metrics import require_columns

BAR_COLUMNS = ["date", "instrument", "open", "high", "low", "close", "volume", "factor"]
STRATEGIES = ("topk_drop", "tdrisk")
WIDE_LIMIT_ALWAYS = ("SH688", "SH689")  # STAR market: 20% limits since it opened
WIDE_LIMIT_FROM_REFORM = ("SZ300", "SZ301")  # ChiNext: 20% limits since the reform day
CHINEXT_REFORM_DATE = pd.Timestamp("2020-08-24")
DAILY_SUM_COLUMNS = [
    "n_bought", "n_sold", "blocked_buy_limit", "blocked_buy_suspended",
    "blocked_sell_limit", "blocked_sell_suspended", "min_cost_trades",
]


@dataclass(frozen=True)
class BacktestConfig:
    topk: int = 50
    """Number of stocks the portfolio holds (k)."""
    n_drop: int = 5
    """Most stocks replaced per day (n)."""
    strategy: str = "topk_drop"
    """topk_drop ranks by mu; tdrisk ranks by mu - eta * sigma."""
    eta: float = 1.0
    """Risk aversion of TDrisk, in the units of the model's mu and sigma."""
    buy_cost: float = 0.0005
    sell_cost: float = 0.0015
    min_cost: float = 5.0
    """Minimum fee per trade, CNY."""
    limit_threshold: float = 0.095
    """Raw daily change at which a main-board stock counts as limit-up (or -down)."""
    wide_limit_threshold: float = 0.195
    """The same for STAR and post-reform ChiNext stocks (20% limits)."""
    lot_size: int = 100
    """Raw shares per lot; 0 trades fractional amounts."""
    capital: float = 1e8
    risk_degree: float = 0.95
    """Share of the cash spent on each day's buys (Qlib's default)."""
    drop_nan_scores: bool = False
    """Drop predictions whose score is NaN instead of refusing them."""
    trading_days_per_year: int = 238

    def validate(self) -> "BacktestConfig":
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"backtest strategy={self.strategy!r}: expected one of {STRATEGIES}")
        if self.topk < 1 or not 0 <= self.n_drop <= self.topk:
            raise ConfigError(f"backtest topk={self.topk}, n_drop={self.n_drop}: expected topk >= 1 and 0 <= n_drop <= topk")
        for name in ("buy_cost", "sell_cost", "min_cost", "eta"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"backtest {name}={getattr(self, name)}: expected a number >= 0")
        if not 0 < self.limit_threshold <= self.wide_limit_threshold:
            raise ConfigError("backtest limit_threshold / wide_limit_threshold: expected 0 < limit <= wide limit")
        if self.lot_size < 0 or self.capital <= 0 or not 0 < self.risk_degree <= 1:
            raise ConfigError(
                f"backtest lot_size={self.lot_size}, capital={self.capital}, risk_degree={self.risk_degree}: "
                "expected lot_size >= 0, capital > 0, 0 < risk_degree <= 1"
            )
        return self


@dataclass
class BacktestResult:
    daily: pd.DataFrame
    """One row per backtest day: return, cost, turnover, bench, excess returns, trade counts, holdings."""
    summary: dict
    """Risk metrics (see module docstring) and the settings that produced them."""


# ----------------------------------------------------------------------------- inputs


def _normalise_dates(values) -> pd.Series:
    return pd.to_datetime(pd.Series(values)).dt.normalize().astype("datetime64[ns]")


def strategy_scores(predictions: pd.DataFrame, config: BacktestConfig, source: str = "predictions") -> pd.DataFrame:
    """date, instrument, score: the ranking key of the configured strategy, validated.
    `source` names the predictions (their file) in errors."""
    needed = ["date", "instrument", "mu"] + (["sigma"] if config.strategy == "tdrisk" else [])
    require_columns(predictions, needed, "predictions")
    if config.strategy == "tdrisk":
        require_risk_estimate(predictions, source)
    frame = pd.DataFrame(
        {
            "date": _normalise_dates(predictions["date"]).to_numpy(),
            "instrument": predictions["instrument"].astype(str).to_numpy(),
        }
    )
    mu = pd.to_numeric(predictions["mu"], errors="coerce").astype("float64").to_numpy()
    if config.strategy == "tdrisk":
        sigma = pd.to_numeric(predictions["sigma"], errors="coerce").astype("float64").to_numpy()
        frame["score"] = mu - config.eta * sigma
    else:
        frame["score"] = mu

    duplicated = frame.duplicated(["date", "instrument"], keep=False)
    if duplicated.any():
        example = frame.loc[duplicated, ["date", "instrument"]].head(3).to_dict("records")
        raise DataError(f"predictions: {int(duplicated.sum())} rows share a (date, instrument) key, e.g. {example}")
    bad = ~np.isfinite(frame["score"].to_numpy())
    if bad.any():
        if not config.drop_nan_scores:
            source = "mu - eta * sigma" if config.strategy == "tdrisk" else "mu"
            example = frame.loc[bad, ["date", "instrument"]].head(3).to_dict("records")
            raise DataError(
                f"predictions: {int(bad.sum())} rows have a NaN/inf score ({source}), e.g. {example}; "
                "pass --drop-nan-scores (drop_nan_scores=True) to drop them"
            )
        frame = frame[~bad]
    if frame.empty:
        raise DataError("predictions: no rows with a finite score")
    return frame.reset_index(drop=True)


def require_risk_estimate(predictions: pd.DataFrame, source: str = "predictions") -> None:
    """TDrisk ranks by mu - eta * sigma: refuse predictions whose sigma is NaN in every row, which
    is how the point-forecast baselines (models/baselines) say they have no risk estimate."""
    sigma = pd.to_numeric(predictions["sigma"], errors="coerce")
    if len(sigma) and sigma.isna().all():
        raise ConfigError(
            f"{source}: sigma is NaN in every row, so the model that wrote these predictions has no risk "
            "estimate (the baselines predict mu only); TDrisk ranks by mu - eta * sigma and needs a model "
            "that predicts sigma (FactorVAE). Use the topk_drop strategy for this file."
        )


def benchmark_close(benchmark: pd.DataFrame, code: str | None) -> pd.Series:
    """The benchmark's close indexed by date, from a long table (date, instrument, close) or (date, close)."""
    require_columns(benchmark, ["date", "close"], "benchmark")
    if "instrument" in benchmark.columns:
        codes = benchmark["instrument"].astype(str)
        if code is None:
            if codes.nunique() != 1:
                raise DataError(f"benchmark: several codes {sorted(codes.unique())}; name one (benchmark code)")
        else:
            if not (codes == code).any():
                raise DataError(f"benchmark: code {code!r} not found; available {sorted(codes.unique())}")
            benchmark = benchmark[codes == code]
    close = pd.Series(
        pd.to_numeric(benchmark["close"], errors="coerce").astype("float64").to_numpy(),
        index=pd.DatetimeIndex(_normalise_dates(benchmark["date"])),
    )
    if close.index.duplicated().any():
        raise DataError(f"benchmark {code or ''}: duplicate dates, e.g. {close.index[close.index.duplicated()][:3].tolist()}")
    return close.sort_index()


def limit_thresholds(instruments: np.ndarray, dates: pd.DatetimeIndex, config: BacktestConfig) -> np.ndarray:
    """[n_dates, n_instruments] price-limit threshold per stock and day."""
    codes = pd.Index(instruments).astype(str)
    always_wide = codes.str.startswith(WIDE_LIMIT_ALWAYS)
    reform_wide = codes.str.startswith(WIDE_LIMIT_FROM_REFORM)
    after_reform = np.asarray(dates >= CHINEXT_REFORM_DATE)
    wide = always_wide[None, :] | (reform_wide[None, :] & after_reform[:, None])
    return np.where(wide, config.wide_limit_threshold, config.limit_threshold)


@dataclass
class _Market:
    """The bars as dense [n_dates, n_instruments] arrays over the backtest calendar."""

    close: np.ndarray  # adjusted close, NaN where no usable bar
    mark: np.ndarray  # close carried forward: the value of a held stock on any day
    factor: np.ndarray
    suspended: np.ndarray
    limit_up: np.ndarray
    limit_down: np.ndarray


def _build_market(bars: pd.DataFrame, instruments: np.ndarray, calendar: pd.DatetimeIndex, config: BacktestConfig) -> _Market:
    bars = bars[["date", "instrument", "close", "volume", "factor"]].copy()
    bars["date"] = _normalise_dates(bars["date"]).to_numpy()
    bars["instrument"] = bars["instrument"].astype(str)
    bars = bars[bars["instrument"].isin(instruments)].sort_values(["instrument", "date"], kind="stable")
    for column in ("close", "volume", "factor"):
        bars[column] = pd.to_numeric(bars[column], errors="coerce").astype("float64")
    # Previous bar of the same stock (a suspended day carries its close), so the change equals
    # the raw daily change even across missing rows.
    bars["change"] = bars["close"] / bars.groupby("instrument")["close"].shift(1) - 1.0

    def wide(column: str) -> np.ndarray:
        table = bars.pivot(index="date", columns="instrument", values=column)
        return table.reindex(index=calendar, columns=instruments).to_numpy(dtype="float64")

    close = wide("close")
    volume = wide("volume")
    change = wide("change")
    factor = wide("factor")
    suspended = ~np.isfinite(close) | ~(volume > 0)
    thresholds = limit_thresholds(instruments, calendar, config)
    with np.errstate(invalid="ignore"):
        limit_up = change >= thresholds
        limit_down = change <= -thresholds
    mark = pd.DataFrame(close).ffill().to_numpy()
    return _Market(close, mark, factor, suspended, limit_up, limit_down)


# ----------------------------------------------------------------------------- strategy


def _rank_desc(candidates: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Candidates (instrument indices) by score, best first; NaN last; ties by instrument index."""
    key = -score[candidates]
    key = np.where(np.isnan(key), np.inf, key)
    return candidates[np.lexsort((candidates, key))]


def topk_drop_decision(score: np.ndarray, held: np.ndarray, topk: int, n_drop: int) -> tuple[np.ndarray, np.ndarray]:
    """(sell, buy) instrument indices for one day of TopK-Drop.

    score: [n_instruments], NaN for stocks without a prediction today; held: indices held now.
    """
    last = _rank_desc(np.asarray(held, dtype=np.int64), score)
    not_held = np.ones(score.shape[0], dtype=bool)
    not_held[last] = False
    candidates = np.flatnonzero(not_held & np.isfinite(score))
    today = _rank_desc(candidates, score)[: max(n_drop + topk - len(last), 0)]
    combined = _rank_desc(np.concatenate([last, today]), score)
    bottom = combined[len(combined) - n_drop:] if n_drop > 0 else combined[:0]
    sell = last[np.isin(last, bottom)]
    buy = today[: max(len(sell) + topk - len(last), 0)]
    return sell, buy


# ----------------------------------------------------------------------------- simulation


def _trade_cost(value: float, rate: float, config: BacktestConfig) -> float:
    return max(value * rate, config.min_cost) if value > 1e-5 else 0.0


def _round_to_lots(amount: float, factor: float, config: BacktestConfig) -> float:
    """Adjusted amount rounded down to whole lots of raw shares."""
    if config.lot_size <= 0 or not np.isfinite(factor) or factor <= 0:
        return amount
    raw_shares = amount * factor
    # The small epsilon keeps an exact lot multiple from losing a lot to float error.
    lots = math.floor(raw_shares / config.lot_size + 1e-9)
    return lots * config.lot_size / factor


def _affordable_value(cash: float, config: BacktestConfig) -> float:
    """Largest trade value whose value + cost fits in cash."""
    if cash * config.buy_cost / (1 + config.buy_cost) >= config.min_cost:
        return cash / (1 + config.buy_cost)
    return max(cash - config.min_cost, 0.0)


def _check_inputs(scores: pd.DataFrame, bars: pd.DataFrame, calendar: pd.DatetimeIndex) -> None:
    known = set(bars["instrument"].astype(str).unique())
    unknown = sorted(set(scores["instrument"].unique()) - known)
    if unknown:
        raise DataError(f"predictions: {len(unknown)} instrument(s) have no bars, e.g. {unknown[:5]}")
    outside = pd.DatetimeIndex(scores["date"].unique()).difference(calendar)
    if len(outside):
        raise DataError(
            f"predictions: {len(outside)} date(s) are not trading days of the bars "
            f"({calendar[0].date()}..{calendar[-1].date()}), e.g. {[str(d.date()) for d in outside[:5]]}"
        )


def run_backtest(
    predictions: pd.DataFrame,
    bars: pd.DataFrame,
    benchmark: pd.DataFrame,
    config: BacktestConfig = BacktestConfig(),
    benchmark_code: str | None = "SH000300",
    *,
    source: str = "predictions",
) -> BacktestResult:
    """Simulate the strategy day by day; see the module docstring for timing and rules.
    `source` names the predictions (their file) in errors."""
    config = config.validate()
    scores = strategy_scores(predictions, config, source)
    require_columns(bars, BAR_COLUMNS, "bars")
    bench = benchmark_close(benchmark, benchmark_code)

    bar_dates = pd.DatetimeIndex(_normalise_dates(bars["date"]).unique())
    if bar_dates.empty:
        raise DataError("bars: no rows")
    # The index trades on every trading day; adding its dates inside the bars' span means a day
    # on which no predicted stock has a bar still counts (everything is suspended then).
    inside = bench.index[(bench.index >= bar_dates.min()) & (bench.index <= bar_dates.max())]
    calendar = bar_dates.union(inside).sort_values()
    _check_inputs(scores, bars, calendar)

    instruments = np.array(sorted(scores["instrument"].unique()))
    market = _build_market(bars, instruments, calendar, config)
    signal_dates = pd.DatetimeIndex(scores["date"].unique()).sort_values()
    first_day = calendar.get_loc(signal_dates[0]) + 1
    last_day = min(calendar.get_loc(signal_dates[-1]) + 2, len(calendar) - 1)
    if first_day > len(calendar) - 1:
        raise DataError(f"bars end on {calendar[-1].date()}: no trading day after the first prediction date to trade on")

    bench_close = bench.reindex(calendar).to_numpy()
    needed = bench_close[first_day - 1: last_day + 1]
    if not np.isfinite(needed).all():
        missing = calendar[first_day - 1: last_day + 1][~np.isfinite(needed)]
        raise DataError(f"benchmark {benchmark_code}: no close on {len(missing)} backtest day(s), e.g. {[str(d.date()) for d in missing[:5]]}")

    score_table = scores.pivot(index="date", columns="instrument", values="score")
    score_wide = score_table.reindex(index=calendar, columns=instruments).to_numpy(dtype="float64")
    has_signal = np.isin(calendar, signal_dates)

    amount = np.zeros(len(instruments))
    cash = float(config.capital)
    value_prev = cash
    rows = []
    for day in range(first_day, last_day + 1):
        counts = dict.fromkeys(DAILY_SUM_COLUMNS, 0)
        cost_today = traded_today = 0.0
        price = market.close[day]
        if has_signal[day - 1]:
            sell, buy = topk_drop_decision(score_wide[day - 1], np.flatnonzero(amount > 0), config.topk, config.n_drop)
            for i in sell:
                if market.suspended[day, i]:
                    counts["blocked_sell_suspended"] += 1
                    continue
                if market.limit_down[day, i]:
                    counts["blocked_sell_limit"] += 1
                    continue
                value = amount[i] * price[i]
                cost = _trade_cost(value, config.sell_cost, config)
                counts["min_cost_trades"] += int(0 < value * config.sell_cost < config.min_cost)
                cash += value - cost
                cost_today += cost
                traded_today += value
                amount[i] = 0.0
                counts["n_sold"] += 1
            budget = cash * config.risk_degree / len(buy) if len(buy) else 0.0
            for i in buy:
                if market.suspended[day, i]:
                    counts["blocked_buy_suspended"] += 1
                    continue
                if market.limit_up[day, i]:
                    counts["blocked_buy_limit"] += 1
                    continue
                shares = _round_to_lots(budget / price[i], market.factor[day, i], config)
                value = shares * price[i]
                if value + _trade_cost(value, config.buy_cost, config) > cash:
                    shares = _round_to_lots(_affordable_value(cash, config) / price[i], market.factor[day, i], config)
                    value = shares * price[i]
                if value <= 1e-5:
                    continue  # less than one lot affordable: no trade, no fee
                cost = _trade_cost(value, config.buy_cost, config)
                counts["min_cost_trades"] += int(value * config.buy_cost < config.min_cost)
                cash -= value + cost
                cost_today += cost
                traded_today += value
                amount[i] += shares
                counts["n_bought"] += 1
        held = amount > 0
        value_now = cash + float(np.dot(amount[held], market.mark[day, held]))
        rows.append(
            {
                "date": calendar[day],
                "signal_date": calendar[day - 1] if has_signal[day - 1] else pd.NaT,
                "value": value_now,
                "cash": cash,
                "return": (value_now - value_prev + cost_today) / value_prev,
                "cost": cost_today / value_prev,
                "turnover": traded_today / value_prev,
                "bench": bench_close[day] / bench_close[day - 1] - 1.0,
                "n_holdings": int(held.sum()),
                "holdings": ";".join(instruments[held]),
                **counts,
            }
        )
        value_prev = value_now

    daily = pd.DataFrame(rows)
    daily["excess_without_cost"] = daily["return"] - daily["bench"]
    daily["excess_with_cost"] = daily["return"] - daily["cost"] - daily["bench"]
    return BacktestResult(daily=daily, summary=summarize_backtest(daily, config, benchmark_code))


# ----------------------------------------------------------------------------- metrics


def risk_analysis(returns: pd.Series, mode: str = "sum", periods_per_year: int = 238) -> dict:
    """Qlib's risk_analysis of a daily return series: mean, std, annualized_return, information_ratio, max_drawdown."""
    r = pd.Series(returns, dtype="float64").dropna()
    if len(r) < 2:
        return dict.fromkeys(["mean", "std", "annualized_return", "information_ratio", "max_drawdown"], math.nan)
    if mode == "sum":
        mean, std = r.mean(), r.std(ddof=1)
        annualized = mean * periods_per_year
        curve = r.cumsum()
        max_drawdown = (curve - curve.cummax()).min()
    elif mode == "product":
        curve = (1.0 + r).cumprod()
        mean = curve.iloc[-1] ** (1.0 / len(r)) - 1.0
        std = np.log1p(r).std(ddof=1)
        annualized = curve.iloc[-1] ** (periods_per_year / len(r)) - 1.0
        max_drawdown = (curve / curve.cummax() - 1.0).min()
    else:
        raise ConfigError(f"risk_analysis mode={mode!r}: expected 'sum' or 'product'")
    ratio = mean / std * math.sqrt(periods_per_year) if std > 0 else math.nan
    return {
        "mean": float(mean),
        "std": float(std),
        "annualized_return": float(annualized),
        "information_ratio": float(ratio),
        "max_drawdown": float(max_drawdown),
    }


def summarize_backtest(daily: pd.DataFrame, config: BacktestConfig, benchmark_code: str | None = None) -> dict:
    """Risk metrics of the excess (with and without cost), absolute and benchmark returns, in both modes."""
    n = config.trading_days_per_year
    series = {
        "excess_return_without_cost": daily["excess_without_cost"],
        "excess_return_with_cost": daily["excess_with_cost"],
        "return_with_cost": daily["return"] - daily["cost"],
        "benchmark_return": daily["bench"],
    }
    summary = {
        "strategy": config.strategy,
        "config": asdict(config),
        "benchmark_code": benchmark_code,
        "start": str(pd.Timestamp(daily["date"].iloc[0]).date()),
        "end": str(pd.Timestamp(daily["date"].iloc[-1]).date()),
        "n_days": int(len(daily)),
        "mean_turnover": float(daily["turnover"].mean()),
        "mean_cost": float(daily["cost"].mean()),
        "mean_holdings": float(daily["n_holdings"].mean()),
    }
    for name, values in series.items():
        summary[name] = {mode: risk_analysis(values, mode, n) for mode in ("sum", "product")}
    summary["counts"] = {column: int(daily[column].sum()) for column in DAILY_SUM_COLUMNS}
    return summary


# ----------------------------------------------------------------------------- files


def load_bars(path, instruments=None, start=None, end=None) -> pd.DataFrame:
    """Long bars through the project's reader (fvae_dist.data.bars), cut to instruments and [start, end]."""
    from fvae_dist.data.bars import open_source

    spec = str(path)
    if not spec.startswith("synthetic") and not Path(spec).exists():
        raise DataError(f"bars {spec}: no such file or directory")
    wanted = None if instruments is None else set(map(str, instruments))
    day = lambda t: None if t is None else np.datetime64(pd.Timestamp(t).date(), "D")  # noqa: E731
    chunks = []
    for chunk in open_source(spec).iter_chunks(instruments_per_chunk=200, start=day(start), end=day(end)):
        if wanted is not None:
            chunk = chunk[chunk["instrument"].astype(str).isin(wanted)]
        chunks.append(chunk)
    frame = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=BAR_COLUMNS)
    require_columns(frame, BAR_COLUMNS, f"bars {path}")
    return frame


def load_benchmark(path, code: str, start=None, end=None) -> pd.DataFrame:
    """The benchmark's long rows (date, instrument, close, ...) for one code, from .parquet or .csv."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark {path}: no such file")
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    require_columns(frame, ["date", "instrument", "close"], f"benchmark {path}")
    frame["date"] = _normalise_dates(frame["date"]).to_numpy()
    keep = frame["instrument"].astype(str) == code
    if not keep.any():
        raise DataError(f"benchmark {path}: code {code!r} not found; codes there: {sorted(frame['instrument'].astype(str).unique())}")
    if start is not None:
        keep &= frame["date"] >= pd.Timestamp(start)
    if end is not None:
        keep &= frame["date"] <= pd.Timestamp(end)
    return frame[keep].reset_index(drop=True)


def bars_window(predictions: pd.DataFrame) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Calendar span of bars a backtest of these predictions needs: a prior close for the first
    day's limit check and two trading days past the last signal (holidays can last ~10 days)."""
    dates = _normalise_dates(predictions["date"])
    return dates.min() - pd.Timedelta(days=20), dates.max() + pd.Timedelta(days=20)


def write_result(result: BacktestResult, out_dir) -> tuple[Path, Path]:
    """<out_dir>/<strategy>_daily.csv and <strategy>_summary.json (the report reads them back)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    strategy = result.summary["strategy"]
    daily_path = out_dir / f"{strategy}_daily.csv"
    summary_path = out_dir / f"{strategy}_summary.json"
    result.daily.to_csv(daily_path, index=False, date_format="%Y-%m-%d")
    summary_path.write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    return daily_path, summary_path


def read_result(out_dir, strategy: str) -> BacktestResult | None:
    """A result written by write_result, or None when that strategy was not run there."""
    out_dir = Path(out_dir)
    daily_path = out_dir / f"{strategy}_daily.csv"
    summary_path = out_dir / f"{strategy}_summary.json"
    if not (daily_path.is_file() and summary_path.is_file()):
        return None
    try:
        daily = pd.read_csv(daily_path, parse_dates=["date"])
        summary = json.loads(summary_path.read_text())
    except (ValueError, OSError) as exc:
        raise DataError(f"{summary_path.parent}: unreadable backtest result for {strategy}: {exc}") from exc
    require_columns(daily, ["date", "return", "cost", "bench", "excess_with_cost", "excess_without_cost"], str(daily_path))
    return BacktestResult(daily=daily, summary=summary)
