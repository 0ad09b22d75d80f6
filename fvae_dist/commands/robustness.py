"""`fvae-dist robustness`: the paper's Experiment 2 (Table 2), a grid of runs with stocks held out.

fvae_dist.robustness (Ray, torch) is imported only when the command runs, so that building the
CLI parser stays fast."""
from __future__ import annotations

import argparse

from fvae_dist.commands.tune import INTERRUPTED
from fvae_dist.config import load_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "robustness",
        help="Experiment 2: train without m random stocks, score Rank IC / ICIR on them (Table 2)",
        description="For every model, m and seed: hold m stocks present in the test span out of training and "
        "validation, train, predict the test span and score the held-out stocks. The runs are one Ray Tune "
        "experiment of named trials, several at once; a failed run is retried, then reported as failed; "
        "re-running keeps finished runs, continues interrupted ones from their checkpoints and retries failed ones. "
        "Before the runs, one data set per (m, seed) is prepared from the source and settings recorded in "
        "data.dataset_dir's manifest, with the feature normalisation fitted WITHOUT that draw's held-out stocks "
        "(each costs about one `fvae-dist prepare` in time and disk; re-runs reuse them); --reuse-normalisation "
        "skips this. Writes OUT/robustness/{results.csv,table2.md,table2.csv,held_out/,data/,runs/,job.json}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="experiment preset (YAML), e.g. tune_configs/robustness_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")
    parser.add_argument("--m", dest="ms", type=int, nargs="+", required=True, metavar="M",
                        help="numbers of held-out stocks, e.g. 50 100 200")
    parser.add_argument("--seeds", type=int, default=5, help="repetitions per m: seeds 0 .. SEEDS-1 (the draw and "
                        "train.seed + seed)")
    parser.add_argument("--models", nargs="+", default=["factorvae"], metavar="MODEL",
                        help="rows of the table: factorvae, prior, port (FactorVAE and its variants) and the baselines "
                             "linear, ca, gru, alstm, gat, trans, sfm (fvae_dist.robustness.MODELS)")
    parser.add_argument("--out", help="parent of the robustness/ folder; None means ray.storage_path")
    parser.add_argument("--max-parallel", type=int, default=0,
                        help="runs at once (Tune's max_concurrent_trials); 0 = as many as the cluster fits (more is capped)")
    parser.add_argument("--sequential", action="store_true", help="one run at a time (same as --max-parallel 1)")
    parser.add_argument("--retries", type=int, default=1, help="times a failed run is started again before it "
                        "is reported as failed (Tune's FailureConfig max_failures)")
    parser.add_argument("--reuse-normalisation", action="store_true",
                        help="train every run on data.dataset_dir as it is: no per-(m, seed) prepares (faster, no "
                        "extra disk), but its normalisation statistics were fitted with the held-out stocks "
                        "present, so their training-span features still shape the model's inputs (an "
                        "approximation of 'never seen'); needed when the data set's source can no longer be read")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fvae_dist.robustness import run_robustness

    cfg = load_config(args.config, args.overrides)
    summary = run_robustness(
        cfg,
        models=args.models,
        ms=args.ms,
        seeds=args.seeds,
        out_dir=args.out or cfg.ray.storage_path,
        max_parallel=1 if args.sequential else args.max_parallel,
        retries=args.retries,
        reuse_normalisation=args.reuse_normalisation,
    )
    print(summary.files["table2_md"].read_text())
    for name in ("results_csv", "table2_md", "table2_csv"):
        print(f"wrote {summary.files[name]}")
    if summary.pending:
        print(f"interrupted: {summary.pending} run(s) unfinished; run the same command again to continue")
        return INTERRUPTED
    return 1 if summary.failed else 0
