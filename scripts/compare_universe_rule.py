"""The universe rule on the validation span: `prepare --universe padded` against `full-window`.

Two runs with the same settings, one trained on each data set, are compared on the same
validation stock-days (the test span is not read). The rows a full-window data set keeps are a
subset of the padded one's (the stocks traded on all T days of their window), so the script
scores:
  - both models on every padded row (the full-window model predicts the padded windows too),
  - both on the full-window rows only (where the two rules' samples agree),
  - both on the rows the full-window rule drops (new listings, stocks back from a suspension),
  - both on each day's index members (e.g. CSI300), for index users.

Input: each run's validation predictions (`fvae-dist predict --split valid`, and for the
full-window run `--dataset <padded data> --allow-other-data`, saved aside), and the full-window
data set's own validation predictions for its row set. Output: JSON and a Markdown table.

    python scripts/compare_universe_rule.py --padded P.parquet --full-window-on-padded F.parquet \
        --full-window-rows G.parquet --membership ../shared/data/cn_csi300/csi300_membership.csv \
        --out docs/results/universe_rule
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fvae_dist.config import write_text_atomic
from fvae_dist.data.bars import read_membership
from fvae_dist.evaluate.metrics import daily_ic, read_predictions, summarize_ic
from fvae_dist.evaluate.report import markdown_table
from fvae_dist.evaluate.universe import restrict_to_members

KEYS = ["date", "instrument"]


def split_rows(frame: pd.DataFrame, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """frame's rows inside `rows` (by date and instrument), and the rest."""
    marked = frame.merge(rows[KEYS].drop_duplicates(), on=KEYS, how="left", indicator=True)
    inside = marked["_merge"] == "both"
    marked = marked.drop(columns="_merge")
    return marked[inside].reset_index(drop=True), marked[~inside].reset_index(drop=True)


def score(frame: pd.DataFrame) -> dict:
    summary = summarize_ic(daily_ic(frame))
    return {"rank_ic": summary["rank_ic"], "rank_icir": summary["rank_icir"], "stock_days": len(frame)}


def compare(padded: pd.DataFrame, full_on_padded: pd.DataFrame, full_rows: pd.DataFrame,
            membership: pd.DataFrame) -> dict:
    if len(padded) != len(full_on_padded):
        raise ValueError(f"the two models' padded predictions differ in length ({len(padded)} against "
                         f"{len(full_on_padded)}): predict both on the same padded data set")
    padded_in, padded_out = split_rows(padded, full_rows)
    full_in, full_out = split_rows(full_on_padded, full_rows)
    return {
        "every padded row": {"padded": score(padded), "full-window": score(full_on_padded)},
        "full-window rows": {"padded": score(padded_in), "full-window": score(full_in),
                             "full-window, its own data set": score(full_rows)},
        "rows only padded keeps": {"padded": score(padded_out), "full-window": score(full_out)},
        "index members": {"padded": score(restrict_to_members(padded, membership)),
                          "full-window": score(restrict_to_members(full_on_padded, membership))},
    }


def markdown(result: dict) -> str:
    rows = []
    for scope, models in result.items():
        for model, value in models.items():
            rows.append([scope, model, f"{value['rank_ic']:.4f}", f"{value['rank_icir']:.3f}", f"{value['stock_days']:,}"])
    return markdown_table(["validation rows", "trained on", "Rank IC", "Rank ICIR", "stock-days"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--padded", required=True, help="padded run's validation predictions")
    parser.add_argument("--full-window-on-padded", required=True,
                        help="full-window run's predictions of the padded data set's validation split")
    parser.add_argument("--full-window-rows", required=True,
                        help="full-window run's predictions of its own validation split (its row set)")
    parser.add_argument("--membership", required=True, help="index membership CSV (instrument, start_date, end_date)")
    parser.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    result = compare(read_predictions(args.padded), read_predictions(args.full_window_on_padded),
                     read_predictions(args.full_window_rows), read_membership(args.membership))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
