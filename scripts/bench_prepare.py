"""Benchmark `prepare`: wall time and peak memory, written as JSON.

Cases (each in a fresh subprocess so its peak RSS is its own):
  csi300_features  the 20 features + label over every stock of ../shared/data/cn_csi300 (compare:
                   Qlib's expression engine took 22 s for the same over 751 stocks on 2 cores)
  csi300_prepare   the whole prepare of that data (Qlib benchmark splits)
  synthetic_large  prepare of a synthetic market of 4,000 stocks x 3,000 days (all A-shares)

    python scripts/bench_prepare.py [--out bench/prepare.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSI300 = (REPO / ".." / "shared" / "data" / "cn_csi300").resolve()
QLIB_SECONDS_751_STOCKS = 22.0  # measured with pyqlib 0.9.7 on this machine class (see the issue)


def run_case(case: str, workdir: str, quick: bool) -> dict:
    import pandas as pd

    from fvae_dist.data.bars import open_source
    from fvae_dist.data.prepare import prepare_dataset, write_feature_table

    started = time.perf_counter()
    if case == "csi300_features":
        source = open_source(str(CSI300 / "stocks_daily.parquet"))
        n_rows = write_feature_table(source, Path(workdir) / "features.parquet", None, None, progress=False)
        info = {"rows": n_rows, "instruments": len(source.instruments)}
    elif case == "csi300_prepare":
        source = open_source(str(CSI300 / "stocks_daily.parquet"), membership=str(CSI300 / "csi300_membership.csv"))
        splits = {
            "train": ("2010-01-01", "2017-12-31"),
            "valid": ("2018-01-01", "2018-12-31"),
            "test": ("2019-01-01", "2020-12-31"),
        }
        result = prepare_dataset(source, Path(workdir) / "ds", splits=splits, progress=False)
        info = {"shards": len(result.manifest["shards"]), "disk": result.manifest["disk"]}
    elif case == "synthetic_large":
        stocks, days = (800, 1000) if quick else (4000, 3000)
        source = open_source(f"synthetic:stocks={stocks},days={days},seed=0")
        result = prepare_dataset(source, Path(workdir) / "ds", progress=False)
        info = {"stocks": stocks, "days": days, "shards": len(result.manifest["shards"]), "disk": result.manifest["disk"]}
    else:
        raise SystemExit(f"unknown case {case}")
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del pd
    return {"case": case, "wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb, 1), **info}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/prepare.json")
    parser.add_argument("--quick", action="store_true", help="smaller synthetic market (800 x 1000)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.workdir, args.quick)))
        return
    results = []
    cases = ["synthetic_large"]
    if (CSI300 / "stocks_daily.parquet").is_file():
        cases = ["csi300_features", "csi300_prepare", *cases]
    for case in cases:
        with tempfile.TemporaryDirectory() as workdir:
            cmd = [sys.executable, __file__, "--case", case, "--workdir", workdir] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]))
    summary = {"cases": results, "qlib_reference_s": QLIB_SECONDS_751_STOCKS}
    features = next((r for r in results if r["case"] == "csi300_features"), None)
    if features:
        summary["speedup_vs_qlib_features"] = round(QLIB_SECONDS_751_STOCKS / features["wall_s"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
