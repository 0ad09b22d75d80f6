"""`fvae-dist evaluate`: IC, ICIR, Rank IC and Rank ICIR of a predictions file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fvae_dist.data.bars import read_membership
from fvae_dist.errors import DataError
from fvae_dist.evaluate.backtest import bars_window, load_bars
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, realised_label, require_columns, summarize_ic
from fvae_dist.evaluate.universe import restrict_to_members


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="IC / Rank IC of predictions",
        description="Daily IC (Pearson) and Rank IC (Spearman) of a score against the realised label "
        "y_t = close[t+2]/close[t+1]-1, and their ratios to the daily std (ICIR, ddof=1 as Qlib).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--predictions", required=True, help="predictions .parquet/.csv: date, instrument, mu, sigma[, label]")
    parser.add_argument("--score-column", default="mu", help="column of the predictions to score")
    parser.add_argument("--label-column", default="label", help="realised-label column (in the predictions or the data set)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--labels-from", metavar="DATASET_DIR", help="take the label from a prepared data set's shards")
    source.add_argument("--bars", help="compute the label from these bars (long table, adjusted close)")
    parser.add_argument("--membership", metavar="PATH",
                        help="score only each day's index members (point-in-time CSV/Parquet: instrument, "
                        "start_date, end_date), e.g. an all-A model for a CSI300 user")
    parser.add_argument("--json", metavar="PATH", help="also write the summary and the daily table as JSON")
    parser.set_defaults(func=run)


def labels_from_dataset(dataset_dir, label_column: str) -> pd.DataFrame:
    """date, instrument, label from every shard of a prepared data set (halo rows dropped)."""
    from fvae_dist.data.shards import load_manifest, read_shard_table
    from fvae_dist.storage import location

    manifest = load_manifest(dataset_dir)
    frames = []
    for entry in manifest["shards"]:
        path = location(dataset_dir) / entry["path"]
        shard = read_shard_table(path).to_pandas()
        require_columns(shard, ["date", "instrument", label_column], f"shard {path}")
        if "in_universe" in shard.columns:
            shard = shard[shard["in_universe"].astype(bool)]
        frames.append(shard[["date", "instrument", label_column]].rename(columns={label_column: "label"}))
    if not frames:
        raise DataError(f"{dataset_dir}: the manifest lists no shards")
    labels = pd.concat(frames, ignore_index=True)
    labels["date"] = pd.to_datetime(labels["date"]).dt.normalize().astype("datetime64[ns]")
    labels["instrument"] = labels["instrument"].astype(str)
    return labels.drop_duplicates(["date", "instrument"])


def attach_label(predictions: pd.DataFrame, args) -> pd.DataFrame:
    """The predictions with a `label` column taken from the source the options name."""
    if args.labels_from:
        labels = labels_from_dataset(args.labels_from, args.label_column)
    elif args.bars:
        start, end = bars_window(predictions)
        labels = realised_label(load_bars(args.bars, predictions["instrument"].unique(), start, end))
    elif args.label_column in predictions.columns:
        return predictions.rename(columns={args.label_column: "label"}) if args.label_column != "label" else predictions
    else:
        raise DataError(
            f"predictions {args.predictions}: no {args.label_column!r} column; "
            "pass --labels-from DATASET_DIR or --bars PATH to get the realised label"
        )
    return predictions.drop(columns=["label"], errors="ignore").merge(labels, on=["date", "instrument"], how="left")


def run(args) -> int:
    predictions = read_predictions(args.predictions)
    require_columns(predictions, [args.score_column], f"predictions {args.predictions}")
    frame = attach_label(predictions, args)
    if args.membership:
        frame = restrict_to_members(frame, read_membership(args.membership))
        if frame.empty:
            raise DataError(f"membership file {args.membership}: no prediction row is a member on its date "
                            f"(predictions {args.predictions}); check that both cover the same stocks and days")
    daily = daily_ic(frame, score=args.score_column, label="label")
    summary = summarize_ic(daily)
    print(f"predictions: {args.predictions} (score column {args.score_column!r})"
          + (f", index members of {args.membership} only: {len(frame):,} stock-days" if args.membership else ""))
    print(f"days: {summary['n_days']} used, {summary['n_skipped_days']} skipped (< 2 stocks or constant values)")
    for key, name in (("ic", "IC"), ("icir", "ICIR"), ("rank_ic", "Rank IC"), ("rank_icir", "Rank ICIR")):
        print(f"{name:>10}: {summary[key]:.4f}")
    if args.json:
        table = daily.assign(date=daily["date"].dt.strftime("%Y-%m-%d")).astype(object)
        daily_rows = table.where(table.notna(), None).to_dict("records")  # JSON null, not NaN
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
        Path(args.json).write_text(json.dumps({"summary": clean, "daily": daily_rows}, indent=2) + "\n")
    return 0
