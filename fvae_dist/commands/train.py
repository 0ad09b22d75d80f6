"""`fvae-dist train --config tune_configs/<preset>.yaml [key=value ...]`: one Ray Train run."""
from __future__ import annotations

import math


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train FactorVAE on Ray Train workers (DDP), with checkpoints, TensorBoard and early stopping",
        description="Overrides are dotted keys typed by the config dataclasses, e.g. train.lr=1e-3 "
        "ray.num_workers=4 data.exclude_instruments=[SH600000,SZ000001]. Re-running with the same "
        "ray.run_name resumes that run from its latest checkpoint.",
    )
    parser.add_argument("--config", default=None, help="YAML preset (see tune_configs/); default: built-in defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-keys", action="store_true", help="list every config key and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from fvae_dist.config import all_keys, config_to_dict, load_config

    if args.list_keys:
        print("\n".join(all_keys()))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0

    from fvae_dist.train.trainer import train

    outcome = train(cfg)
    metrics = outcome.metrics
    history = metrics.get("history") or [{}]
    last = history[-1]
    print(f"run folder: {outcome.run_dir}")
    print(f"epochs completed: {metrics.get('epochs_completed')}"
          + (" (stopped early)" if metrics.get("stopped_early") else ""))
    best = metrics.get("best_epoch")
    # console epochs count from 1; metrics.json and checkpoint names keep 0-based indices
    print(f"best epoch: {best + 1 if best is not None else 'n/a'}  valid Rank IC {_fmt(metrics.get('best_valid_rank_ic'))}"
          f"  (checkpoint {metrics.get('best_checkpoint')})")
    for split, values in (metrics.get("final") or {}).items():
        print(f"{split:5s} IC {_fmt(values.get('ic'))}  ICIR {_fmt(values.get('icir'))}  "
              f"Rank IC {_fmt(values.get('rank_ic'))}  Rank ICIR {_fmt(values.get('rank_icir'))}")
    if last:
        print(f"throughput (last epoch): {_fmt(last.get('perf_stock_days_per_s'), 0)} stock-days/s, "
              f"data wait {_fmt(100 * (last.get('perf_data_wait_fraction') or 0), 1)}%")
    print(f"tensorboard --logdir {outcome.run_dir / 'tensorboard'}")
    return 0


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"
