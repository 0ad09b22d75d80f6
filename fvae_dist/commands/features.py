"""`fvae-dist features`: the raw Alpha158 features and label, as users inspect them."""
from __future__ import annotations

from fvae_dist.commands.source_args import add_source_arguments, open_source_from_args


def add_parser(subparsers) -> None:
    from fvae_dist.data.features import FEATURE_SETS

    parser = subparsers.add_parser(
        "features",
        help="write raw (unprocessed) features and LABEL0 to one Parquet file",
        description="Writes date, instrument, the feature columns and LABEL0: exactly the values the "
        "processors of `prepare` receive.",
    )
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="output Parquet file")
    parser.add_argument("--start", default=None, help="first date (YYYY-MM-DD), default: first trading day")
    parser.add_argument("--end", default=None, help="last date (YYYY-MM-DD), default: last trading day")
    parser.add_argument("--feature-set", default="alpha158_20", choices=sorted(FEATURE_SETS),
                        help="alpha158_20 (default): the 20 Alpha158 features of the paper and Qlib's time-series "
                        "benchmarks; alpha158: all 158, in Qlib's order")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fvae_dist.data.prepare import write_feature_table

    source = open_source_from_args(args)
    n_rows = write_feature_table(
        source, args.out, args.start, args.end, feature_set=args.feature_set, progress=not args.no_progress
    )
    print(f"wrote {n_rows} rows to {args.out}")
    return 0
