"""`fvae-dist backtest`: TopK-Drop / TDrisk portfolio backtest of a predictions file against a benchmark."""
from __future__ import annotations

import argparse
from pathlib import Path

from fvae_dist.evaluate.backtest import (
    BacktestConfig,
    bars_window,
    load_bars,
    load_benchmark,
    require_risk_estimate,
    run_backtest,
    write_result,
)
from fvae_dist.evaluate.metrics import read_predictions

DEFAULTS = BacktestConfig()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The strategy and market-rule options (shared with `fvae-dist report`)."""
    group = parser.add_argument_group("strategy and market rules")
    group.add_argument("--topk", type=int, default=DEFAULTS.topk, help="stocks held (k)")
    group.add_argument("--n-drop", type=int, default=DEFAULTS.n_drop, help="most stocks replaced per day (n)")
    group.add_argument("--eta", type=float, default=DEFAULTS.eta, help="TDrisk risk aversion: rank by mu - eta * sigma")
    group.add_argument("--buy-cost", type=float, default=DEFAULTS.buy_cost, help="buy fee rate")
    group.add_argument("--sell-cost", type=float, default=DEFAULTS.sell_cost, help="sell fee rate, stamp duty included")
    group.add_argument("--min-cost", type=float, default=DEFAULTS.min_cost, help="minimum fee per trade, CNY")
    group.add_argument("--limit-threshold", type=float, default=DEFAULTS.limit_threshold, help="raw daily change counted as a price limit")
    group.add_argument("--wide-limit-threshold", type=float, default=DEFAULTS.wide_limit_threshold, help="the same for STAR and post-2020-08-24 ChiNext stocks")
    group.add_argument("--lot-size", type=int, default=DEFAULTS.lot_size, help="raw shares per lot; 0 for fractional amounts")
    group.add_argument("--capital", type=float, default=DEFAULTS.capital, help="starting cash, CNY")
    group.add_argument("--risk-degree", type=float, default=DEFAULTS.risk_degree, help="share of the cash spent on a day's buys")
    group.add_argument("--drop-nan-scores", action="store_true", help="drop predictions with a NaN score instead of failing")


def config_from_args(args, strategy: str) -> BacktestConfig:
    return BacktestConfig(
        topk=args.topk,
        n_drop=args.n_drop,
        strategy=strategy,
        eta=args.eta,
        buy_cost=args.buy_cost,
        sell_cost=args.sell_cost,
        min_cost=args.min_cost,
        limit_threshold=args.limit_threshold,
        wide_limit_threshold=args.wide_limit_threshold,
        lot_size=args.lot_size,
        capital=args.capital,
        risk_degree=args.risk_degree,
        drop_nan_scores=args.drop_nan_scores,
    ).validate()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "backtest",
        help="TopK-Drop / TDrisk backtest of predictions",
        description="Signal of day t traded at the close of t+1, earning close[t+2]/close[t+1]-1; "
        "A-share costs, suspensions and price limits; metrics of the excess return over the benchmark.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--predictions", required=True, help="predictions .parquet/.csv: date, instrument, mu[, sigma]")
    parser.add_argument("--bars", required=True, help="daily bars: long table with date, instrument, open, high, low, close, volume, factor")
    parser.add_argument("--benchmark", required=True, help="index bars, same long layout (e.g. index_daily.parquet)")
    parser.add_argument("--benchmark-code", default="SH000300", help="instrument code of the benchmark index")
    parser.add_argument("--strategy", choices=["topk_drop", "tdrisk", "both"], default="topk_drop")
    parser.add_argument("--out", help="folder for <strategy>_daily.csv and <strategy>_summary.json (e.g. RUN/backtest)")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['strategy']}: {summary['start']}..{summary['end']} ({summary['n_days']} days), "
        f"benchmark {summary['benchmark_code']}, mean daily turnover {summary['mean_turnover']:.3f}",
        f"{'':36s}{'AR':>9s}{'IR':>8s}{'MDD':>9s}   (sum = Qlib's convention; product = compounded)",
    ]
    for key in ("excess_return_without_cost", "excess_return_with_cost", "return_with_cost", "benchmark_return"):
        for mode in ("sum", "product"):
            m = summary[key][mode]
            lines.append(
                f"{key + ' ' + mode:36s}{m['annualized_return']:9.2%}{m['information_ratio']:8.2f}{m['max_drawdown']:9.2%}"
            )
    lines.append("blocked trades: " + ", ".join(f"{k}={v}" for k, v in summary["counts"].items()))
    return "\n".join(lines)


def run(args) -> int:
    predictions = read_predictions(args.predictions)
    if args.strategy in ("tdrisk", "both") and "sigma" in predictions.columns:
        require_risk_estimate(predictions, str(args.predictions))  # before the bars are read
    start, end = bars_window(predictions)
    bars = load_bars(args.bars, predictions["instrument"].unique(), start, end)
    benchmark = load_benchmark(args.benchmark, args.benchmark_code, start, end)
    strategies = ["topk_drop", "tdrisk"] if args.strategy == "both" else [args.strategy]
    for strategy in strategies:
        result = run_backtest(predictions, bars, benchmark, config_from_args(args, strategy), args.benchmark_code,
                              source=str(args.predictions))
        print(format_summary(result.summary))
        if args.out:
            daily_path, summary_path = write_result(result, Path(args.out))
            print(f"wrote {daily_path} and {summary_path}")
    return 0
