"""The robustness job (Experiment 2): held-out stocks never reach training, nor the normalisation
statistics of the inputs; scores are on them only.

The end-to-end tests share one real (tiny) grid trained on Ray from a prepared synthetic market,
and instrument the data path: a model builder, run inside every Train worker, wraps the loop's
batch iterator and records the instruments of every batch that worker sees, tagged train
(drop_last=True) or eval. The grid takes 1-2 minutes on 2 cores (4 runs, 2 at a time); the file's
other tests take seconds.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from ray import cloudpickle
from scipy.stats import spearmanr

from fvae_dist import cli
from fvae_dist.config import load_config
from fvae_dist.data.bars import open_source
from fvae_dist.data.features import features_frame
from fvae_dist.data.prepare import prepare_dataset
from fvae_dist.data.shards import iter_shard_days, load_manifest, manifest_hash, shard_entries
from fvae_dist.errors import ConfigError, DataError
from fvae_dist.evaluate.report import build_report
from fvae_dist.robustness import (MODELS, RunSpec, draw_held_out, resolve_models, run_one, run_robustness, scorable_instruments,
                                  score_held_out)
from tests.data.frame_source import random_walk_bars
from tests.train.toy_dataset import write_toy_dataset

# The builders and fake run functions below run in Ray workers, which cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N_STOCKS = 24
SYNTHETIC = "synthetic:stocks=24,days=100,seed=0"
SEQ_LEN = 5


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("rob") / "data", n_stocks=N_STOCKS, seq_len=5, n_features=4,
                             split_days={"train": 24, "valid": 6, "test": 10},
                             shards_per_split={"train": 2, "valid": 1, "test": 1})


@pytest.fixture(scope="module")
def market_dir(tmp_path_factory) -> Path:
    """A data set prepared from a source its manifest can reopen (the job re-prepares from it)."""
    out = tmp_path_factory.mktemp("market") / "data"
    prepare_dataset(open_source(SYNTHETIC), out, seq_len=SEQ_LEN, shard_rows=1_000, progress=False)
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_config(dataset_dir: Path, storage: Path, *extra: str, num_features: int = 4):
    return load_config(None, [
        f"data.dataset_dir={dataset_dir}", f"model.num_features={num_features}", "model.seq_len=5", "model.hidden_size=4",
        "model.num_factors=2", "model.num_portfolios=4", "train.epochs=1", "train.early_stopping_patience=0",
        "ray.num_workers=1", "ray.cpus_per_worker=0.5", "ray.num_cpus=2", f"ray.storage_path={storage}", *extra,
    ])


def split_instruments(dataset_dir: Path, split: str) -> set[str]:
    manifest = load_manifest(dataset_dir)
    return {str(name) for entry in shard_entries(manifest, split)
            for day in iter_shard_days(dataset_dir, entry, drop_nan_label=True, manifest=manifest)
            for name in day.instruments}


# ---------------------------------------------------------------------------------------------- instrumentation

class RecordingBuilder:
    """A model_builder that records the instruments of every batch the worker's loop draws."""

    def __init__(self, record_dir: Path):
        self.record_dir = str(record_dir)

    def __call__(self, model_cfg):
        import fvae_dist.train.loop as loop
        from fvae_dist.models.factorvae import build_model

        run = ray.train.get_context().get_experiment_name()
        path = Path(self.record_dir) / f"{run}.{os.getpid()}.jsonl"
        # training batches come through training_batches (from the feeder actor or in-process),
        # evaluation batches through iter_day_batches
        if not getattr(loop.training_batches, "_records_instruments", False):
            loop.training_batches = _recording(loop.training_batches, path, "train")
            loop.iter_day_batches = _recording(loop.iter_day_batches, path, "eval")
        return build_model(model_cfg)


def failing_once(name: str, marker_dir: Path):
    """run_one, except that the first attempt of run `name` fails before it trains."""
    def run(cfg_dict, spec, held_out, model_builder=None):
        marker = Path(marker_dir) / f"{spec.name}.failed-once"
        if spec.name == name and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure on the first attempt")
        return run_one(cfg_dict, spec, held_out, model_builder)

    return run


def _recording(original, path: Path, phase: str):
    """`original` (a function returning batches), recording each batch's instruments."""
    def recording(*args, **kwargs):
        for batch in original(*args, **kwargs):
            seen = sorted({str(name) for day in batch["instruments"] for name in day})
            with open(path, "a") as handle:
                handle.write(json.dumps({"phase": phase, "instruments": seen}) + "\n")
            yield batch

    recording._records_instruments = True
    return recording


def recorded(record_dir: Path, run: str) -> dict[str, set[str]]:
    seen = {"train": set(), "eval": set(), "batches": 0}
    for path in record_dir.glob(f"{run}.*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            seen[row["phase"]].update(row["instruments"])
            seen["batches"] += 1
    return seen


# ---------------------------------------------------------------------------------------------- fast checks

def test_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(ConfigError, match=r"lstm.*factorvae"):
        resolve_models(["factorvae", "lstm"])
    assert resolve_models(["port", "factorvae", "port"]) == ["port", "factorvae"]
    assert resolve_models(["factorvae", "gru", "ca"]) == ["factorvae", "gru", "ca"]  # the baselines


def test_every_model_choice_selects_a_buildable_model():
    from fvae_dist.config import load_config
    from fvae_dist.models.registry import build_model

    assert {"factorvae", "prior", "port", "linear", "ca", "gru", "alstm", "gat", "trans", "sfm"} <= set(MODELS)
    for choice in MODELS.values():
        cfg = load_config(None, [f"{k}={v}" for k, v in choice.overrides.items()])
        build_model(cfg.model)  # raises for a name or variant that does not exist


def test_cli_reports_unknown_model_as_an_error(capsys):
    assert cli.main(["robustness", "--m", "5", "--models", "lstm", "--seeds", "1"]) == 2
    assert "lstm" in capsys.readouterr().err


def test_draws_are_seeded_nested_and_bounded():
    pool = [f"S{i:03d}" for i in range(30)]
    small, large = draw_held_out(pool, 5, seed=3), draw_held_out(pool, 12, seed=3)
    assert small == draw_held_out(list(reversed(pool)), 5, seed=3)  # the pool's order does not matter
    assert set(small) < set(large) and len(set(large)) == 12
    assert draw_held_out(pool, 12, seed=4) != large
    with pytest.raises(ConfigError, match="m <= 30"):
        draw_held_out(pool, 31, seed=0)


def test_test_instruments_are_those_scorable_in_the_test_span(toy_dir):
    assert set(scorable_instruments(toy_dir, "test")) == split_instruments(toy_dir, "test")


def test_scores_use_only_the_held_out_stocks():
    rng = np.random.default_rng(0)
    dates = np.repeat(pd.date_range("2021-01-04", periods=5), 6)
    names = np.tile([f"S{i}" for i in range(6)], 5)
    label = rng.standard_normal(30)
    held = ["S0", "S1", "S2"]
    # the held-out stocks are ranked perfectly, the others exactly backwards
    mu = np.where(np.isin(names, held), label, -label)
    scores = score_held_out(pd.DataFrame({"date": dates, "instrument": names, "mu": mu, "label": label}), held)
    assert scores["rank_ic"] == pytest.approx(1.0) and (scores["n_days"], scores["n_stocks"]) == (5, 3)
    with pytest.raises(DataError, match="lack 1 held-out"):
        score_held_out(pd.DataFrame({"date": dates, "instrument": names, "mu": mu, "label": label}), held + ["S9"])


# ---------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def grid(market_dir, tmp_path_factory, ray_cluster):
    """The real grid (factorvae x m in {4, 8} x 2 seeds), one run failing once and retried."""
    tmp_path = tmp_path_factory.mktemp("grid")
    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "out"
    cfg = tiny_config(market_dir, tmp_path / "unused", num_features=20)
    retried = RunSpec("factorvae", 4, 1).name
    messages = []
    summary = run_robustness(cfg, models=["factorvae"], ms=[4, 8], seeds=2, out_dir=out, retries=1,
                             model_builder=RecordingBuilder(records), run_fn=failing_once(retried, records),
                             log=messages.append)
    return {"summary": summary, "out": out, "root": out / "robustness", "records": records, "cfg": cfg,
            "messages": messages, "tmp": tmp_path}


@pytest.mark.timeout(480)  # ~70 s on 2 idle cores; generous for a shared, busy machine
def test_grid_holds_stocks_out_of_training_and_scores_exactly_them(grid, market_dir):
    summary, out, records, cfg, tmp_path = grid["summary"], grid["out"], grid["records"], grid["cfg"], grid["tmp"]
    assert summary.max_parallel == 2  # 2 CPUs, 0.5 per run, 1 kept for Ray Data
    results = pd.read_csv(out / "robustness" / "results.csv")
    assert len(results) == 4 and (results["status"] == "ok").all(), results
    assert results.set_index("seed").loc[1].set_index("m").loc[4, "attempts"] == 2
    train_pool = split_instruments(market_dir, "train")
    for row in results.itertuples():
        held_out = (out / "robustness" / row.held_out_file).read_text().split()
        assert len(held_out) == row.m
        seen = recorded(records, RunSpec("factorvae", row.m, row.seed).name)
        assert seen["batches"] > 0, "the recording builder did not see the data path"
        assert not seen["train"] & set(held_out), f"{row.run_dir}: held-out stocks in a training batch"
        assert not seen["eval"] & set(held_out), f"{row.run_dir}: held-out stocks in a validation batch"
        assert seen["train"] == train_pool - set(held_out)  # everything else was trained on

        predictions = pd.read_parquet(out / "robustness" / row.run_dir / "predictions" / "test.parquet")
        assert set(held_out) < set(predictions["instrument"])  # predicted among all the others
        mine = predictions[predictions["instrument"].isin(held_out)].dropna(subset=["label"])
        daily = [spearmanr(day["mu"], day["label"])[0] for _, day in mine.groupby("date") if len(day) >= 2]
        daily = np.array([value for value in daily if np.isfinite(value)])
        assert row.n_days == len(daily) and row.n_stocks == row.m
        assert row.rank_ic == pytest.approx(daily.mean(), abs=1e-9)
        assert row.rank_icir == pytest.approx(daily.mean() / daily.std(ddof=1), abs=1e-9)

    table = pd.read_csv(out / "robustness" / "table2.csv")
    assert sorted(table["m"]) == [4, 8] and (table["runs_ok"] == 2).all()
    for m in (4, 8):
        cell = results[results["m"] == m]
        assert table.set_index("m").loc[m, "rank_ic_mean"] == pytest.approx(cell["rank_ic"].mean())
    assert "m=8 Rank ICIR" in (out / "robustness" / "table2.md").read_text()
    report = build_report([], tmp_path / "report", robustness_csv=out / "robustness" / "results.csv")
    assert "m=4 Rank IC" in report.read_text()

    again = run_robustness(cfg, models=["factorvae"], ms=[4, 8], seeds=2, out_dir=out, log=lambda _: None)
    assert (again.ran, again.skipped, again.failed) == (0, 4, 0)
    job = json.loads((out / "robustness" / "job.json").read_text())
    assert (job["prepare"]["prepared"], job["prepare"]["reused"]) == (0, 4)  # the data sets are reused as they are
    with pytest.raises(ConfigError, match="train.epochs"):
        run_robustness(tiny_config(market_dir, tmp_path / "unused", "train.epochs=2", num_features=20),
                       models=["factorvae"], ms=[4], seeds=1, out_dir=out, log=lambda _: None)


def hand_fitted_statistics(spec: str, train_span: tuple[str, str], leave_out: set[str]) -> dict[str, tuple]:
    """median and 1.4826 * MAD of every feature over the training span's universe stock-days (a
    bar that day, a member that day) of every stock not in leave_out, computed from the raw bars."""
    source = open_source(spec)
    bars = pd.concat(list(source.iter_chunks()), ignore_index=True)
    frame = features_frame(bars, calendar=source.calendar)
    frame = frame.merge(bars[["date", "instrument", "close"]], on=["date", "instrument"], how="left")
    frame = frame.merge(source.membership, on="instrument", how="left")
    start, end = (pd.Timestamp(day) for day in train_span)
    keep = ((frame["date"] >= start) & (frame["date"] <= end) & frame["close"].notna()
            & (frame["date"] >= frame["start_date"]) & (frame["date"] <= frame["end_date"])
            & ~frame["instrument"].isin(leave_out))
    stats = {}
    for name in source_features(frame):
        values = frame.loc[keep, name].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        median = np.median(values)
        stats[name] = (median, (np.median(np.abs(values - median)) + 1e-12) * 1.4826)
    return stats


def source_features(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in {"date", "instrument", "LABEL0", "close", "start_date", "end_date"}]


@pytest.mark.timeout(480)  # shares the grid with the test above; alone it pays for it
def test_each_run_is_normalised_without_its_held_out_stocks_and_still_predicts_them(grid, market_dir):
    root = grid["root"]
    base = load_manifest(market_dir)
    train_span = (base["normalization"]["fit_start"], base["normalization"]["fit_end"])
    with_everyone = hand_fitted_statistics(SYNTHETIC, train_span, set())
    for name, (median, scale) in with_everyone.items():  # the hand computation reproduces a plain prepare
        assert base["normalization"]["median"][name] == pytest.approx(median, rel=1e-6, abs=1e-9)
        assert base["normalization"]["scale"][name] == pytest.approx(scale, rel=1e-6, abs=1e-9)

    job = json.loads((root / "job.json").read_text())
    for row in pd.read_csv(root / "results.csv").itertuples():
        held_out = (root / row.held_out_file).read_text().split()
        record = json.loads((root / row.run_dir / "robustness.json").read_text())
        run_data = root / "data" / f"m{row.m}-seed{row.seed}"
        assert Path(record["config"]["data"]["dataset_dir"]) == run_data  # the run trained on its own data set
        assert record["manifest_hash"] == manifest_hash(run_data)
        assert job["prepare"]["datasets"][run_data.name]["path"] == f"data/{run_data.name}"
        stats = load_manifest(run_data)["normalization"]
        assert stats["fit_excluded_instruments"]["instruments"] == sorted(held_out)
        expected = hand_fitted_statistics(SYNTHETIC, train_span, set(held_out))
        for name, (median, scale) in expected.items():
            assert stats["median"][name] == pytest.approx(median, rel=1e-6, abs=1e-9), name
            assert stats["scale"][name] == pytest.approx(scale, rel=1e-6, abs=1e-9), name
        moved = [name for name in expected if not np.isclose(stats["median"][name], with_everyone[name][0],
                                                             rtol=1e-9, atol=0)]
        assert moved, "leaving the held-out stocks out changed no statistic: the check would prove nothing"

        predictions = pd.read_parquet(root / row.run_dir / "predictions" / "test.parquet")
        mine = predictions[predictions["instrument"].isin(held_out)]
        assert set(mine["instrument"]) == set(held_out) and np.isfinite(mine["mu"]).all()


def fake_run(cfg_dict, spec, held_out, model_builder=None):
    """Stands in for training: seed 1 always fails, the others score by seed."""
    if spec.seed == 1:
        raise RuntimeError(f"broken run {spec.name}")
    return {"rank_ic": 0.01 * (spec.seed + 1), "rank_icir": 0.1, "ic": 0.0, "icir": 0.0, "n_days": 3,
            "n_stocks": len(held_out), "wall_s": 0.0}


@pytest.mark.timeout(240)
def test_failed_runs_are_retried_reported_and_redone_on_rerun(toy_dir, tmp_path, ray_cluster):
    cfg = tiny_config(toy_dir, tmp_path)
    messages = []
    # the toy data set has no source to re-prepare from: every run shares it, as the flag says
    summary = run_robustness(cfg, models=["factorvae", "port"], ms=[3], seeds=3, out_dir=tmp_path, retries=2,
                             log=messages.append, run_fn=fake_run, reuse_normalisation=True)
    assert not (tmp_path / "robustness" / "data").exists()
    assert "reuse-normalisation" in json.loads((tmp_path / "robustness" / "job.json").read_text())["prepare"][
        "normalisation"]
    results = summary.results.set_index(["model_key", "seed"])
    assert summary.failed == 2 and (summary.ran, summary.skipped) == (6, 0)
    for model in ("factorvae", "port"):
        assert results.loc[(model, 1), "status"] == "failed"
        assert results.loc[(model, 1), "attempts"] == 3
        assert "broken run" in results.loc[(model, 1), "error"]
        assert results.loc[(model, 0), "status"] == "ok" and results.loc[(model, 0), "attempts"] == 1
    table_md = (tmp_path / "robustness" / "table2.md").read_text()
    assert table_md.count("[1 of 3 failed]") == 4  # Rank IC and Rank ICIR of both models
    table = pd.read_csv(tmp_path / "robustness" / "table2.csv")
    assert (table["runs_failed"] == 1).all()
    assert table["rank_ic_mean"].tolist() == pytest.approx([0.02, 0.02])  # mean of seeds 0 and 2 only
    assert any("FAILED" in message for message in messages)

    again = run_robustness(cfg, models=["factorvae", "port"], ms=[3], seeds=3, out_dir=tmp_path, retries=0,
                           log=lambda _: None, run_fn=fake_run, reuse_normalisation=True)
    assert (again.ran, again.skipped, again.failed) == (2, 4, 2)  # only the failed runs run again


def test_a_source_that_cannot_be_reopened_is_a_config_error_suggesting_the_flag(toy_dir, tmp_path):
    table = tmp_path / "bars.parquet"
    random_walk_bars(n_stocks=20, n_days=120, seed=2).to_parquet(table, index=False)
    dataset = tmp_path / "data"
    prepare_dataset(open_source(str(table)), dataset, seq_len=SEQ_LEN, shard_rows=1_000, progress=False)
    table.rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(ConfigError) as error:
        run_robustness(tiny_config(dataset, tmp_path, num_features=20), models=["factorvae"], ms=[3], seeds=1,
                       out_dir=tmp_path, log=lambda _: None)
    message = str(error.value)
    assert str(dataset / "manifest.json") in message and str(table) in message and "no longer exists" in message
    assert "--reuse-normalisation" in message
    # a data set written without a source (the toy layout) says so, with the same way out
    with pytest.raises(ConfigError, match=r"manifest.json: records no way to reopen.*--reuse-normalisation") as error:
        run_robustness(tiny_config(toy_dir, tmp_path), models=["factorvae"], ms=[3], seeds=1, out_dir=tmp_path,
                       log=lambda _: None)
    assert str(toy_dir / "manifest.json") in str(error.value)
