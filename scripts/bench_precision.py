"""What bf16 does to quality: the demo configuration trained in fp32 and in bf16, seed by seed.

    python scripts/bench_precision.py [--seeds 6] [--out bench/precision.json] [--dataset DIR]

Each seed trains tune_configs/demo.yaml twice with the real `train()` (Ray Train, Ray Data
input), once per precision, and scores the test span. The runs use one worker with two days per
step, which is the demo's optimisation (two workers x one day, gradients averaged) without its
timing dependence: with two workers, which days meet in a step depends on which worker asks
Ray Data first, so a rerun of one seed differs; with one worker a seed fixes the day order and
the sampling noise, and the fp32-bf16 difference of a seed is the precision's alone.
Writes JSON (every run, means, paired differences) and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_train import WORK, prepare_market  # noqa: E402
from fvae_dist.config import load_config, write_text_atomic  # noqa: E402

PRECISIONS = ("fp32", "bf16")
# the demo's two workers x one day per step, as one worker x two days (see the docstring)
DETERMINISTIC = ("ray.num_workers=1", "ray.cpus_per_worker=1", "data.batch_days=2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds 0..N-1, each trained in both precisions")
    parser.add_argument("--out", default=str(REPO / "bench" / "precision.json"))
    parser.add_argument("--dataset", default=None, help="a prepared data set (default: the benchmark market)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds: expected an integer >= 1, got {args.seeds}")
    dataset = Path(args.dataset) if args.dataset else prepare_market(days=600)

    import ray

    from fvae_dist.train.trainer import train

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    runs = []
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            name = f"precision-{precision}-seed{seed}"
            shutil.rmtree(WORK / "runs" / name, ignore_errors=True)
            cfg = load_config(REPO / "tune_configs" / "demo.yaml", [
                f"data.dataset_dir={dataset}", f"train.precision={precision}", f"train.seed={seed}",
                f"ray.storage_path={WORK / 'runs'}", f"ray.run_name={name}", "train.keep_checkpoints=1",
                *DETERMINISTIC])
            started = time.perf_counter()
            metrics = train(cfg).metrics
            runs.append({"precision": precision, "seed": seed, "epochs": metrics["epochs_completed"],
                         "best_epoch": metrics["best_epoch"],
                         **{f"{split}_{key}": metrics["final"][split][key]
                            for split in ("valid", "test") for key in ("rank_ic", "rank_icir")},
                         "wall_s": time.perf_counter() - started})
            print(f"{precision} seed {seed}: test Rank IC {runs[-1]['test_rank_ic']:.4f} "
                  f"(valid {runs[-1]['valid_rank_ic']:.4f}, best epoch {metrics['best_epoch'] + 1})", flush=True)
    ray.shutdown()

    report = summarise(runs)
    report.update(config="tune_configs/demo.yaml", overrides=list(DETERMINISTIC), dataset=str(dataset))
    out = Path(args.out)
    write_text_atomic(out, json.dumps(report, indent=1))
    table = markdown(report)
    write_text_atomic(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def summarise(runs: list[dict]) -> dict:
    """Means per precision and the paired bf16 - fp32 difference per seed (mean, std error)."""
    by = {(r["precision"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    summary = {}
    for key in ("test_rank_ic", "test_rank_icir", "valid_rank_ic"):
        values = {p: np.array([by[p, s][key] for s in seeds]) for p in PRECISIONS}
        diff = values["bf16"] - values["fp32"]
        summary[key] = {
            **{f"{p}_mean": float(values[p].mean()) for p in PRECISIONS},
            **{f"{p}_std": float(values[p].std(ddof=1)) if len(seeds) > 1 else None for p in PRECISIONS},
            "bf16_minus_fp32_mean": float(diff.mean()),
            "bf16_minus_fp32_stderr": float(diff.std(ddof=1) / np.sqrt(len(seeds))) if len(seeds) > 1 else None,
        }
    return {"runs": runs, "seeds": seeds, "summary": summary}


def markdown(report: dict) -> str:
    by = {(r["precision"], r["seed"]): r for r in report["runs"]}
    lines = ["| seed | fp32 test Rank IC | bf16 test Rank IC | bf16 - fp32 |", "| --- | --- | --- | --- |"]
    for seed in report["seeds"]:
        fp32, bf16 = by["fp32", seed]["test_rank_ic"], by["bf16", seed]["test_rank_ic"]
        lines.append(f"| {seed} | {fp32:.4f} | {bf16:.4f} | {_signed(bf16 - fp32)} |")
    s = report["summary"]["test_rank_ic"]
    stderr = f" ± {s['bf16_minus_fp32_stderr']:.4f}" if s["bf16_minus_fp32_stderr"] is not None else ""
    lines.append(f"| mean | {s['fp32_mean']:.4f} | {s['bf16_mean']:.4f} | {_signed(s['bf16_minus_fp32_mean'])}{stderr} |")
    return "\n".join(lines) + "\n"


def _signed(value: float) -> str:
    """+0.0012 / -0.0012, and 0.0000 for a difference that rounds to zero (never -0.0000)."""
    text = f"{value:+.4f}"
    return "0.0000" if text in ("+0.0000", "-0.0000") else text


if __name__ == "__main__":
    main()
