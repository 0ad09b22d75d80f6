"""`fvae-dist reproduce`: the paper's experiments (Tables 1-3, Figure 6) as grids on the one runner.

    load_reproduction(path) -> ReproductionSpec      reproduce/spec.py
    run_reproduction(spec) -> ReproductionOutcome    reproduce/run.py (selection, runs, robustness)
    write_tables(spec, outcome)                      reproduce/tables.py
"""
from fvae_dist.reproduce.run import ReproductionOutcome, run_reproduction
from fvae_dist.reproduce.spec import ReproductionSpec, load_reproduction

__all__ = ["ReproductionOutcome", "ReproductionSpec", "load_reproduction", "run_reproduction"]
