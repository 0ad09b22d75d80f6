"""Benchmark `prepare`: wall time and peak memory, written as JSON.

Cases (each in a fresh subprocess so its peak RSS is its own):
  csi300_features  the features + label over every stock of ../shared/data/cn_csi300 (compare:
                   Qlib's expression engine took 22 s for the 20 features over 751 stocks on 2 cores;
                   for another feature set pass Qlib's own time, measured beside it, as --qlib-seconds)
  csi300_compute   the same features held in memory as one frame (read the Parquet, compute): what
                   Qlib's D.features does, for a side-by-side timing (`fvae-dist features` also validates
                   the table and writes zstd Parquet)
  csi300_prepare   the whole prepare of that data (Qlib benchmark splits)
  synthetic_large  prepare of a synthetic market of 4,000 stocks x 3,000 days (all A-shares)
  cn_all_prepare   prepare of ../shared/data/cn_all (all A-shares, the paper's split); only when named
                   in --cases: it writes several GB

    python scripts/bench_prepare.py [--out bench/prepare.json] [--quick] [--feature-set alpha158]
                                    [--cases csi300_features cn_all_prepare] [--qlib-seconds S]

Each row has wall_s, cpu_s (user + system of the case's process: on a shared machine it moves less
than the wall time) and peak_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FVAE_SHARED_DIR") or REPO / ".." / "shared").resolve()  # as tests/conftest.py
CSI300 = SHARED / "data" / "cn_csi300"
CN_ALL = SHARED / "data" / "cn_all"
PAPER_SPLITS = {"train": ("2010-01-01", "2017-12-31"), "valid": ("2018-01-01", "2018-12-31"),
                "test": ("2019-01-01", "2020-12-31")}
DEFAULT_CASES = ("csi300_features", "csi300_compute", "csi300_prepare", "synthetic_large")
QLIB_SECONDS_751_STOCKS = 22.0  # measured with pyqlib 0.9.7 on this machine class (see the issue)


def run_case(case: str, workdir: str, quick: bool, feature_set: str) -> dict:
    import pandas as pd

    from fvae_dist.data.bars import open_source
    from fvae_dist.data.prepare import prepare_dataset, write_feature_table

    started = time.perf_counter()
    if case == "csi300_features":
        source = open_source(str(CSI300 / "stocks_daily.parquet"))
        n_rows = write_feature_table(source, Path(workdir) / "features.parquet", None, None,
                                     feature_set=feature_set, progress=False)
        info = {"rows": n_rows, "instruments": len(source.instruments)}
    elif case == "csi300_compute":
        from fvae_dist.data.features import features_frame

        bars = pd.read_parquet(CSI300 / "stocks_daily.parquet")
        calendar = pd.read_csv(CSI300 / "calendar.csv").iloc[:, 0].to_numpy()
        frame = features_frame(bars, feature_set, calendar=calendar)
        info = {"rows": len(frame), "instruments": int(frame["instrument"].nunique()), "columns": frame.shape[1] - 2}
    elif case == "csi300_prepare":
        source = open_source(str(CSI300 / "stocks_daily.parquet"), membership=str(CSI300 / "csi300_membership.csv"))
        result = prepare_dataset(source, Path(workdir) / "ds", splits=PAPER_SPLITS, feature_set=feature_set,
                                 progress=False)
        info = {"shards": len(result.manifest["shards"]), "disk": result.manifest["disk"]}
    elif case == "cn_all_prepare":
        source = open_source(str(CN_ALL / "stocks_daily.parquet"))
        result = prepare_dataset(source, Path(workdir) / "ds", splits=PAPER_SPLITS, feature_set=feature_set,
                                 progress=False)
        info = {"instruments": len(source.instruments), "shards": len(result.manifest["shards"]),
                "disk": result.manifest["disk"],
                "stock_days": {name: s["n_stock_days"] for name, s in result.manifest["splits"].items()}}
    elif case == "synthetic_large":
        stocks, days = (800, 1000) if quick else (4000, 3000)
        source = open_source(f"synthetic:stocks={stocks},days={days},seed=0")
        result = prepare_dataset(source, Path(workdir) / "ds", feature_set=feature_set, progress=False)
        info = {"stocks": stocks, "days": days, "shards": len(result.manifest["shards"]), "disk": result.manifest["disk"]}
    else:
        raise SystemExit(f"unknown case {case}")
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    del pd
    return {"case": case, "feature_set": feature_set, "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **info}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/prepare.json")
    parser.add_argument("--quick", action="store_true", help="smaller synthetic market (800 x 1000)")
    parser.add_argument("--feature-set", default="alpha158_20", choices=("alpha158_20", "alpha158"))
    parser.add_argument("--cases", nargs="+", default=None,
                        choices=(*DEFAULT_CASES, "cn_all_prepare"), help=f"default: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--qlib-seconds", type=float, default=None,
                        help="Qlib's D.features wall time for the same features over the CSI300 table, measured "
                        "beside this run (default: the 22 s of the 20 features)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.workdir, args.quick, args.feature_set)))
        return
    results = []
    cases = list(args.cases or DEFAULT_CASES)
    if not (CSI300 / "stocks_daily.parquet").is_file():
        cases = [c for c in cases if not c.startswith("csi300")]
    if not (CN_ALL / "stocks_daily.parquet").is_file():
        cases = [c for c in cases if c != "cn_all_prepare"]
    for case in cases:
        with tempfile.TemporaryDirectory() as workdir:
            cmd = [sys.executable, __file__, "--case", case, "--workdir", workdir, "--feature-set", args.feature_set]
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]))
    qlib_seconds = args.qlib_seconds
    if qlib_seconds is None and args.feature_set == "alpha158_20":
        qlib_seconds = QLIB_SECONDS_751_STOCKS
    summary = {"feature_set": args.feature_set, "cases": results, "qlib_reference_s": qlib_seconds}
    for case in ("csi300_features", "csi300_compute"):
        row = next((r for r in results if r["case"] == case), None)
        if row and qlib_seconds:
            summary[f"speedup_vs_qlib_{case.removeprefix('csi300_')}"] = round(qlib_seconds / row["wall_s"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
