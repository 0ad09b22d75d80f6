"""`fvae-dist prepare`: raw bars -> sharded Parquet data set with manifest.json."""
from __future__ import annotations

from fvae_dist.commands.source_args import add_source_arguments, open_source_from_args


def add_parser(subparsers) -> None:
    from fvae_dist.data.features import FEATURE_SETS
    from fvae_dist.data.prepare import DEFAULT_SHARD_ROWS

    parser = subparsers.add_parser(
        "prepare",
        help="build a training data set (features, processors, shards, manifest)",
        description="Re-running with unchanged input and settings is a no-op. Splits default to 70/15/15 "
        "of the trading calendar.",
    )
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="data set directory (written atomically), or a URI such as s3://bucket/data/NAME (built locally, "
                        "uploaded with manifest.json last)")
    parser.add_argument("--train", default=None, help="START:END, e.g. 2010-01-01:2017-12-31")
    parser.add_argument("--valid", default=None, help="START:END")
    parser.add_argument("--test", default=None, help="START:END")
    parser.add_argument("--seq-len", type=int, default=20, help="days per window T (default 20)")
    parser.add_argument("--feature-set", default="alpha158_20", choices=sorted(FEATURE_SETS),
                        help="alpha158_20 (default): the 20 Alpha158 features of the paper and Qlib's time-series "
                        "benchmarks; alpha158: all 158, in Qlib's order")
    parser.add_argument("--universe", default="padded", choices=("padded", "full-window"),
                        help="a day's samples: padded (default) every stock with a bar that day, windows "
                        "zero-padded where history is missing (Qlib's way); full-window only stocks traded "
                        "on all T days of the window (the paper's eq. 2: no padding, no suspended days)")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="target stock-days per shard")
    parser.add_argument("--chunk-size", type=int, default=256, help="instruments per processing chunk (memory bound)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fvae_dist.data.prepare import prepare_dataset
    from fvae_dist.data.splits import parse_range
    from fvae_dist.errors import ConfigError

    given = {name: getattr(args, name) for name in ("train", "valid", "test") if getattr(args, name)}
    if given and len(given) != 3:
        raise ConfigError("give all of --train, --valid and --test, or none (default 70/15/15)")
    splits = {name: parse_range(text, f"--{name}") for name, text in given.items()} or None
    source = open_source_from_args(args)
    result = prepare_dataset(
        source,
        args.out,
        splits=splits,
        seq_len=args.seq_len,
        feature_set=args.feature_set,
        shard_rows=args.shard_rows,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        universe=args.universe,
    )
    manifest = result.manifest
    if result.reused:
        print(f"{result.path}: up to date (same input and settings), nothing to do")
        return 0
    for name, split in manifest["splits"].items():
        print(
            f"{name:5s} {split['start']}..{split['end']}: {split['n_days']} days, "
            f"{split['n_stock_days']} stock-days, {split['n_instruments']} stocks, "
            f"universe {split['universe_size']['mean']} per day"
        )
    disk = manifest["disk"]
    print(
        f"wrote {len(manifest['shards'])} shards to {result.path} "
        f"({disk['shard_bytes'] / 1e6:.1f} MB, {disk['bytes_ratio']:.2f}x the day-level feature table)"
    )
    return 0
