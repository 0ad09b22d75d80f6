"""What FactorVAE's sigma (eq. 12) says about risk, on the validation span: the evidence for RQ3.

    python scripts/sigma_validation.py --runs RUN [RUN ...] --membership csi300_membership.csv \
        [--split valid] [--out docs/results/sigma_validation]

For each run's predictions/<split>.parquet (date, instrument, mu, sigma, label: the raw next-day
return) and for two universes (every stock, each day's index members), averaged over the days:
  sigma ~ |r - mean r|    daily Spearman correlation of sigma with the size of the stock's move away
                          from the day's mean return: does sigma rank realised risk?
  sigma ~ mu, sigma ~ r   how the risk estimate relates to the expected and the realised return
  top 50 by mu - eta sigma, for each eta: the 50 stocks' mean return over the day's mean and their
                          mean |r - mean r|: what TDrisk (k = 50) buys, before its drop rule and costs
Writes <out>.md and <out>.json (mean and std over runs, and each run). Only the validation span is
read unless --split says otherwise: TDrisk's test figures stay in Table 3.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fvae_dist.config import write_text_atomic  # noqa: E402
from fvae_dist.data.bars import read_membership  # noqa: E402
from fvae_dist.evaluate.metrics import daily_ic  # noqa: E402
from fvae_dist.evaluate.universe import restrict_to_members  # noqa: E402

ETAS = (0.0, 0.05, 0.2, 1.0)
TOP = 50


def daily_spearman(frame: pd.DataFrame, a: str, b: str) -> float:
    """Spearman correlation of a and b within each day, averaged over the days (metrics.daily_ic's Rank IC)."""
    return float(daily_ic(frame, score=a, label=b)["rank_ic"].mean())


def sigma_figures(predictions: pd.DataFrame) -> dict:
    p = predictions.dropna(subset=["mu", "sigma", "label"]).copy()
    p["excess"] = p["label"] - p.groupby("date")["label"].transform("mean")   # over the universe's day
    p["move"] = p["excess"].abs()
    out = {"stock_days": len(p),
           "sigma_vs_move": daily_spearman(p, "sigma", "move"),
           "sigma_vs_mu": daily_spearman(p, "sigma", "mu"),
           "sigma_vs_return": daily_spearman(p, "sigma", "label"),
           "mu_vs_return": daily_spearman(p, "mu", "label")}
    for eta in ETAS:
        top = p.assign(score=p["mu"] - eta * p["sigma"]).sort_values("score", ascending=False).groupby("date").head(TOP)
        by_day = top.groupby("date")
        out[f"top{TOP}_excess_eta{eta:g}"] = float(by_day["excess"].mean().mean())
        out[f"top{TOP}_move_eta{eta:g}"] = float(by_day["move"].mean().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders with predictions/<split>.parquet")
    parser.add_argument("--membership", required=True, help="index membership (instrument, start_date, end_date)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "sigma_validation"))
    args = parser.parse_args()

    membership = read_membership(args.membership)
    per_run = {}
    for run in map(Path, args.runs):
        path = run / "predictions" / f"{args.split}.parquet"
        if not path.is_file():
            raise SystemExit(f"{path}: no predictions for split {args.split!r} (run `fvae-dist predict` first)")
        predictions = pd.read_parquet(path, columns=["date", "instrument", "mu", "sigma", "label"])
        members = restrict_to_members(predictions, membership)
        per_run[run.name] = {"all stocks": sigma_figures(predictions), "index members": sigma_figures(members)}
        print(f"{run.name}: sigma ~ move {per_run[run.name]['all stocks']['sigma_vs_move']:.3f} (all), "
              f"{per_run[run.name]['index members']['sigma_vs_move']:.3f} (members)", flush=True)

    summary = {}
    for universe in ("all stocks", "index members"):
        frame = pd.DataFrame([figures[universe] for figures in per_run.values()])
        summary[universe] = {key: {"mean": float(frame[key].mean()), "std": float(frame[key].std(ddof=1))
                                   if len(frame) > 1 else 0.0} for key in frame.columns}
    document = {"split": args.split, "runs": [str(r) for r in args.runs], "membership": args.membership,
                "summary": summary, "per_run": per_run}
    write_text_atomic(f"{args.out}.json", json.dumps(document, indent=1))
    write_text_atomic(f"{args.out}.md", markdown(document))
    print(markdown(document))


def markdown(document: dict) -> str:
    s = document["summary"]
    runs = len(document["per_run"])
    lines = [f"# sigma on the {document['split']} span ({runs} runs, mean (std) over runs)", "",
             "Written by `scripts/sigma_validation.py`. Excess return: a stock's next-day return minus that day's mean "
             "over the universe of the column; `move`: its absolute value.",
             "", "| figure | all stocks | each day's index members |", "| --- | --- | --- |"]

    def cell(universe, key, scale=1.0, digits=3):
        v = s[universe][key]
        return f"{v['mean'] * scale:.{digits}f} ({v['std'] * scale:.{digits}f})"

    for key, label in (("sigma_vs_move", "Spearman(sigma, move), daily mean"),
                       ("sigma_vs_mu", "Spearman(sigma, mu)"), ("sigma_vs_return", "Spearman(sigma, next-day return)"),
                       ("mu_vs_return", "Spearman(mu, next-day return): Rank IC")):
        lines.append(f"| {label} | {cell('all stocks', key)} | {cell('index members', key)} |")
    for eta in ETAS:
        lines.append(f"| top {TOP} by mu - {eta:g} sigma: mean excess return, % a day | "
                     f"{cell('all stocks', f'top{TOP}_excess_eta{eta:g}', 100)} | "
                     f"{cell('index members', f'top{TOP}_excess_eta{eta:g}', 100)} |")
    for eta in ETAS:
        lines.append(f"| top {TOP} by mu - {eta:g} sigma: mean move, % | "
                     f"{cell('all stocks', f'top{TOP}_move_eta{eta:g}', 100)} | "
                     f"{cell('index members', f'top{TOP}_move_eta{eta:g}', 100)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
