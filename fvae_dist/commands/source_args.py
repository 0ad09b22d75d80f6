"""The --source/--market/--membership options shared by commands that read raw bars."""
from __future__ import annotations

import argparse


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        required=True,
        help="a Qlib binary data directory, a long table (.parquet/.csv: date, instrument, open, high, low, "
        "close, volume[, factor]), or 'synthetic[:stocks=300,days=1000,seed=0]'",
    )
    parser.add_argument("--market", default="all", help="universe name: a Qlib directory reads instruments/<market>.txt; a long table looks for <market>_membership.csv beside it (default all)")
    parser.add_argument(
        "--membership",
        default=None,
        help="point-in-time universe: CSV/Parquet with instrument, start_date, end_date (default: every stock with data)",
    )


def open_source_from_args(args):
    from fvae_dist.data.bars import open_source

    return open_source(args.source, market=args.market, membership=args.membership)
