"""`fvae-dist report`: the paper's tables (markdown) and figures (PNG) from run folders."""
from __future__ import annotations

import argparse
import shlex
import sys

from fvae_dist.commands.backtest import add_config_arguments, config_from_args
from fvae_dist.evaluate.report import build_report


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables and plots from run folders",
        description="Table 1 (Rank IC, Rank ICIR), Table 2 (robustness), Table 3 (AR, SR, MDD of the excess "
        "return) and PNG figures, runs grouped by model name with mean (std) over seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run folders, or folders of run folders")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the PNGs")
    parser.add_argument("--split", default="test", help="predictions/<split>.parquet to read in each run")
    parser.add_argument("--bars", help="bars to backtest runs without a backtest/ folder (and to compute missing labels)")
    parser.add_argument("--benchmark", help="index bars for those backtests (e.g. index_daily.parquet)")
    parser.add_argument("--benchmark-code", default="SH000300")
    parser.add_argument("--robustness", metavar="CSV", help="robustness results (model, m, seed, rank_ic, rank_icir); "
                        "DIR/robustness/results.csv is also picked up")
    parser.add_argument("--rolling-window", type=int, default=20, help="days in the rolling mean of the Rank IC plot")
    parser.add_argument("--calibration-label", choices=["auto", "csranknorm", "raw"], default="auto",
                        help="units of the label in the calibration plot: csranknorm for a model whose mu/sigma are in "
                        "the CSRankNorm'd training target's units, raw for returns; auto picks by the scale of sigma")
    parser.add_argument("--calibration-bins", type=int, default=10)
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    path = build_report(
        args.runs,
        args.out,
        split=args.split,
        bars_path=args.bars,
        benchmark_path=args.benchmark,
        benchmark_code=args.benchmark_code,
        backtest_config=config_from_args(args, "topk_drop"),
        robustness_csv=args.robustness,
        rolling_window=args.rolling_window,
        calibration_label=args.calibration_label,
        calibration_bins_n=args.calibration_bins,
        command_line="fvae-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    print(f"wrote {path}")
    return 0
