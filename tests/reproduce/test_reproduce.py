"""fvae-dist reproduce end to end on a small synthetic market: selection on validation, seeds,
predictions, Tables 1 and 3 with a seed ensemble, Figure 6, provenance; a rerun trains nothing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fvae_dist.data.bars import open_source
from fvae_dist.data.prepare import prepare_dataset
from fvae_dist.errors import ConfigError
from fvae_dist.reproduce import load_reproduction, run_reproduction
from fvae_dist.reproduce.run import finished_so_far
from fvae_dist.reproduce.tables import write_tables

SOURCE = "synthetic:stocks=60,days=220,seed=3"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    source = open_source(SOURCE)
    prepare_dataset(source, root / "data", progress=False)
    bars = pd.concat(list(source.iter_chunks(instruments_per_chunk=100)), ignore_index=True)
    index = bars.groupby("date", as_index=False)["close"].mean().assign(instrument="SH000300")
    index.to_parquet(root / "index.parquet")
    pd.DataFrame({"instrument": sorted(bars["instrument"].unique()), "start_date": "2000-01-01",
                  "end_date": "2100-01-01"}).to_csv(root / "members.csv", index=False)
    return root


def _spec_file(root, **changes):
    spec = {
        "name": "paper", "storage_path": str(root / "runs"), "results_dir": str(root / "results"),
        "base": {"config": str(REPO / "tune_configs" / "demo.yaml"),
                 "overrides": {"model.hidden_size": 8, "model.num_portfolios": 8, "model.num_factors": 2,
                               "train.epochs": 1, "train.early_stopping_patience": 0, "ray.num_workers": 1,
                               "ray.cpus_per_worker": 0.45, "ray.num_cpus": 2}},
        "data": {"dataset_dir": str(root / "data"), "membership": str(root / "members.csv"),
                 "bars": SOURCE, "benchmark": str(root / "index.parquet")},
        "models": {"factorvae": {"seeds": 2}, "linear": {"seeds": 1}},
        "selection": {"grid": {"train.lr": [1.0e-3, 3.0e-3]}, "overrides": {"train.lr_schedule": "constant"}},
        "backtest": {"topk": 10, "n_drop": 2, "etas": [0.0, 0.5]},
        "ensembles": ["factorvae"],
        "max_concurrent": 1, "max_failures": 0,
        **changes,
    }
    path = root / "tune_configs" / "paper.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_interrupted_grid_stops_the_reproduction_there(market, monkeypatch, tmp_path):
    """Ctrl+C ends Ray Tune's run of the grid at hand (fit() returns); the reproduction then stops
    instead of starting the next model's grid, and the command says it is unfinished."""
    import fvae_dist.reproduce.run as reproduce_run
    from fvae_dist.tune.grid import GridOutcome, GridTrial

    calls = []

    def stopped_grid(name, storage_path, trials, **kwargs):
        calls.append(name)
        return GridOutcome(experiment_dir=tmp_path, trials={t: GridTrial(t, "pending", tmp_path / t) for t in trials},
                           ran=list(trials), resumed=False, concurrency=1)

    monkeypatch.setattr(reproduce_run, "run_grid", stopped_grid)
    spec = load_reproduction(_spec_file(market, results_dir=str(tmp_path / "results")), [])
    outcome = run_reproduction(spec, log=lambda _: None)
    assert calls == ["paper-factorvae-select"]
    assert list(outcome.models) == ["factorvae"] and outcome.models["factorvae"].choice is None


def test_table2_runs_once_its_models_are_trained_before_the_other_rows(market, monkeypatch, tmp_path):
    """On a small machine the grid runs for days: Table 2 starts as soon as the last of its models
    has its runs, not after every Table 1 row (the slow baselines come last)."""
    import fvae_dist.reproduce.run as reproduce_run
    from fvae_dist.tune.grid import GridOutcome, GridTrial

    calls = []

    def finished_grid(name, storage_path, trials, **kwargs):
        calls.append(name)
        return GridOutcome(experiment_dir=tmp_path, trials={t: GridTrial(t, "ok", tmp_path / t) for t in trials},
                           ran=list(trials), resumed=False, concurrency=1)

    def robustness_job(spec, outcome, model_builder, log):
        calls.append("robustness: " + ", ".join(sorted(outcome.models)))
        return type("Summary", (), {"pending": 0})()

    monkeypatch.setattr(reproduce_run, "run_grid", finished_grid)
    monkeypatch.setattr(reproduce_run, "_valid_rank_ic", lambda run_dir: 0.05)
    monkeypatch.setattr(reproduce_run, "_robustness", robustness_job)
    spec = load_reproduction(_spec_file(market, results_dir=str(tmp_path / "results"),
                                        models={"factorvae": {"seeds": 1}, "gru": {"seeds": 1},
                                                "linear": {"seeds": 1}, "sfm": {"seeds": 1}},
                                        robustness={"m": [5], "seeds": 1, "models": ["gru", "factorvae"]},
                                        ensembles=[]), [])
    run_reproduction(spec, log=lambda _: None, tables=False)
    assert calls == ["paper-factorvae-select", "paper-factorvae", "paper-gru-select", "paper-gru",
                     "robustness: factorvae, gru",
                     "paper-linear-select", "paper-linear", "paper-sfm-select", "paper-sfm"]


def test_a_bad_file_is_refused_before_anything_runs(market):
    with pytest.raises(ConfigError, match="models.lstm: unknown model"):
        load_reproduction(_spec_file(market, models={"lstm": {"seeds": 1}}))
    with pytest.raises(ConfigError, match="ensembles: 'linear' needs to be a model with seeds >= 2"):
        load_reproduction(_spec_file(market, ensembles=["linear"]))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_reproduce_chooses_on_validation_trains_seeds_and_writes_the_tables(market, fvae_ray):
    spec = load_reproduction(_spec_file(market))
    outcome = run_reproduction(spec, log=lambda line: None)
    factorvae = outcome.models["factorvae"]
    # the choice is the candidate with the best validation Rank IC, and only validation decides
    scores = factorvae.selection
    assert set(scores) == {"factorvae-lr0p001", "factorvae-lr0p003"} and None not in scores.values()
    best = max(scores, key=scores.get)
    assert factorvae.choice == {"train.lr": 1.0e-3 if best.endswith("0p001") else 3.0e-3}
    assert sorted(factorvae.runs) == ["factorvae-seed0", "factorvae-seed1"] and not factorvae.pending
    for run in factorvae.runs.values():
        config = yaml.safe_load(open(f"{run}/config.yaml"))
        assert config["train"]["lr"] == factorvae.choice["train.lr"]
        assert config["train"]["lr_schedule"] == "cosine"          # the selection's budget stays in selection
        for split in ("valid", "test"):
            predictions = pd.read_parquet(f"{run}/predictions/{split}.parquet")
            assert len(predictions) > 0 and np.isfinite(predictions["mu"]).all()

    files = outcome.files
    table1 = files["table1_md"].read_text()
    assert "| FactorVAE |" in table1 and "| Linear |" in table1 and "ensemble of 2 seeds" in table1
    rows = pd.read_csv(files["table1_csv"])
    assert len(rows) == 2 + 1 + 1                                   # two seeds, one linear run, the ensemble
    assert rows["all_rank_ic"].between(-1, 1).all()
    table3 = pd.read_csv(files["table3_csv"])
    assert {"FactorVAE", "FactorVAE (TDrisk)", "Linear"} <= set(table3["method"])
    assert "Linear (TDrisk)" not in set(table3["method"])          # no risk estimate, no TDrisk
    assert set(table3.loc[table3["method"] == "FactorVAE (TDrisk)", "eta"]) <= {0.0, 0.5}
    assert files["figure6"].stat().st_size > 10_000
    provenance = json.loads(files["provenance"].read_text())
    assert set(provenance["config_sha256"]) == {"factorvae-seed0", "factorvae-seed1", "linear-seed0"}
    assert provenance["packages"]["torch"].startswith("2.")
    validation = files["validation"].read_text()
    assert "chosen" in validation
    # each run's validation predictions, scored on all stocks and on the index members
    from fvae_dist.evaluate.metrics import daily_ic, read_predictions, summarize_ic
    seed0 = summarize_ic(daily_ic(read_predictions(f"{factorvae.runs['factorvae-seed0']}/predictions/valid.parquet")))
    row = next(line for line in validation.splitlines() if line.startswith("| FactorVAE | factorvae-seed0 |"))
    assert f"{seed0['rank_ic']:.4f} / {seed0['rank_icir']:.3f}" in row
    assert "| Linear | linear-seed0 |" in validation
    assert "| FactorVAE (ensemble of 2 seeds) | factorvae-seed0, factorvae-seed1 |" in validation
    # TDrisk's eta table names each run too (the Linear baseline has no risk estimate: no eta)
    eta_table = validation.split("TDrisk's eta per run")[1]
    assert "| FactorVAE | factorvae-seed1 |" in eta_table and "linear" not in eta_table

    again = run_reproduction(spec, log=lambda line: None, tables=False)
    assert again.models["factorvae"].runs == factorvae.runs        # nothing retrained
    on_disk = finished_so_far(spec)
    assert on_disk.models["factorvae"].choice == factorvae.choice
    assert sorted(write_tables(spec, on_disk, log=lambda line: None)) == sorted(files)
