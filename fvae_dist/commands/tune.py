"""`fvae-dist tune --config tune_configs/<campaign>.yaml [key=value ...]`: a Ray Tune + Optuna campaign."""
from __future__ import annotations

INTERRUPTED = 130  # the shell's code for "stopped by Ctrl+C"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="hyperparameter campaign: Optuna (TPE) proposes, ASHA stops weak trials, each trial is a train run",
        description="Runs the campaign in the YAML (sections base, space, tune; see tune_configs/tune_tiny.yaml). "
        "Running the same command again continues an interrupted campaign: finished trials are kept, "
        "running ones continue from their latest checkpoint. Overrides: tune.KEY=VALUE or "
        "tune.resources.KEY=VALUE set campaign settings, any other dotted key (data.dataset_dir=DIR, "
        "train.epochs=3) overrides the base training config.",
    )
    parser.add_argument("--config", required=True, help="campaign YAML (tune_configs/tune_*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="campaign or base config overrides")
    parser.add_argument("--retry-errored", action="store_true",
                        help="when continuing, rerun trials that failed (their Train runs resume from checkpoints)")
    parser.add_argument("--print-spec", action="store_true", help="print the resolved campaign and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from fvae_dist.tune import load_campaign, run_campaign

    spec = load_campaign(args.config, args.overrides)
    if args.print_spec:
        print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
        return 0
    outcome = run_campaign(spec, retry_errored=args.retry_errored)
    folder = outcome.experiment_dir
    print(f"experiment folder: {folder}" + (" (continued)" if outcome.resumed else ""))
    print((folder / "results.md").read_text() if (folder / "results.md").is_file() else "no trial has ended yet")
    if outcome.best is not None:
        print(f"best trial: {outcome.best.trial_id}  {spec.tune.metric} {outcome.best.score:.4f}")
        print(f"best config: {folder / 'best_config.yaml'}  (fvae-dist train --config {folder / 'best_config.yaml'})")
        print(f"best checkpoint: {outcome.best.best_checkpoint}")
    print(f"tensorboard --logdir {folder}")
    if outcome.unfinished:
        print(f"interrupted: {outcome.unfinished} of {spec.tune.num_samples} trials unfinished; "
              "run the same command again to continue")
        return INTERRUPTED
    if outcome.failed:
        print(f"{len(outcome.failed)} trial(s) failed (see the error column of {folder / 'results.csv'}); "
              "rerun with --retry-errored to try them again")
        return 1
    return 0
