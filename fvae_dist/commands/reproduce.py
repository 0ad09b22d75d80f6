"""`fvae-dist reproduce`: the paper's experiments on its own universe, one resumable command.

fvae_dist.reproduce (Ray, torch) is imported only when the command runs."""
from __future__ import annotations

import argparse

from fvae_dist.commands.tune import INTERRUPTED


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="the paper's Tables 1-3 and Figure 6: every model, several seeds, robustness, backtests",
        description="For every model of the reproduction file: choose its settings on the validation span "
        "(selection grid, seed 0), train its seeds, predict validation and test; then the robustness grid; then "
        "Table 1 (Rank IC / ICIR on all stocks and on each day's index members), Table 2, Table 3 (TopK-Drop and "
        "TDrisk on the index members, eta chosen on validation), Figure 6, validation.md and reproduce.json in "
        "results_dir. Every step is a Ray Tune grid bounded by the cluster: re-running the same command skips "
        "finished runs, continues interrupted ones from their checkpoints and retries failed ones.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="reproduction file, e.g. tune_configs/reproduce_paper.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="top-level settings: name, storage_path, results_dir, max_concurrent, max_failures")
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite the tables from the runs finished so far, train nothing")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fvae_dist.reproduce import load_reproduction, run_reproduction
    from fvae_dist.reproduce.run import finished_so_far
    from fvae_dist.reproduce.tables import write_tables

    spec = load_reproduction(args.config, args.overrides)
    if args.tables_only:
        outcome = finished_so_far(spec)
        files = write_tables(spec, outcome)
    else:
        outcome = run_reproduction(spec)
        files = outcome.files
    for name, path in files.items():
        print(f"wrote {path}")
    waiting = [key for key, p in outcome.models.items() if p.choice is None or p.pending]
    missing = [row.key for row in spec.models if row.key not in outcome.models]
    if waiting or missing:
        print(f"unfinished: {', '.join(waiting + missing)}; run the same command again to continue")
        return INTERRUPTED
    return 0
