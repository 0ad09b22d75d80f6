"""`fvae-dist predict --run <run dir> --split test`: predictions of the best checkpoint."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score a split with a run's best checkpoint -> <run>/predictions/<split>.parquet",
        description="Uses only the prediction path (feature extractor, factor predictor, decoder); "
        "every stock-day of the split is scored, held-out stocks included.",
    )
    parser.add_argument("--run", required=True, help="run folder (<storage_path>/<run_name>; a path or a URI such as s3://bucket/runs/NAME)")
    parser.add_argument("--split", default="test", help="split name in the data set (default test)")
    parser.add_argument("--dataset", default=None, help="data set directory (default: the run's data.dataset_dir)")
    parser.add_argument("--batch-days", type=int, default=16, help="days per forward pass (default 16)")
    parser.add_argument("--exposures", action="store_true", help="also write the factor exposures beta_0..beta_K-1")
    parser.add_argument("--allow-other-data", action="store_true",
                        help="score a data set whose manifest differs from the one the run was trained on")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fvae_dist.evaluate.metrics import daily_ic, summarize_ic
    from fvae_dist.storage import read_parquet
    from fvae_dist.train.predict import predict_split

    path = predict_split(
        args.run,
        args.split,
        dataset_dir=args.dataset,
        batch_days=args.batch_days,
        exposures=args.exposures,
        allow_other_data=args.allow_other_data,
    )
    frame = read_parquet(path)
    summary = summarize_ic(daily_ic(frame, "mu", "label"))
    print(f"wrote {path} ({len(frame)} stock-days, {frame['date'].nunique()} days)")
    print(f"IC {summary['ic']:.4f}  ICIR {summary['icir']:.4f}  Rank IC {summary['rank_ic']:.4f}  "
          f"Rank ICIR {summary['rank_icir']:.4f}  ({summary['n_days']} days)")
    return 0
