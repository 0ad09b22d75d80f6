"""The robustness job (Experiment 2): held-out stocks never reach training, nor the normalisation
statistics of the inputs; scores are on them only.

The end-to-end tests share one real (tiny) grid trained on Ray from a prepared synthetic market,
and instrument the data path: a model builder, run inside every Train worker, wraps the loop's
batch iterator and records the instruments of every batch that worker sees, tagged train
(drop_last=True) or eval. Two more grids on the toy data set check what happens to failed runs
and to a job interrupted midway (through the CLI). These are the slow tests (minutes each on
2 cores); the file's other tests take seconds.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import yaml
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
from fvae_dist.robustness import (MODELS, HeldOutScoring, RunSpec, draw_held_out, resolve_models, run_robustness,
                                  scorable_instruments, score_held_out)
from fvae_dist.tune.grid import read_record
from tests.data.frame_source import random_walk_bars
from tests.toy_dataset import write_toy_dataset
from tests.tune.conftest import start_cli, wait_for

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


def tiny_config(dataset_dir: Path, storage: Path, *extra: str, num_features: int = 4):
    return load_config(None, [
        f"data.dataset_dir={dataset_dir}", f"model.num_features={num_features}", "model.seq_len=5", "model.hidden_size=4",
        "model.num_factors=2", "model.num_portfolios=4", "train.epochs=1", "train.early_stopping_patience=0",
        "ray.num_workers=1", "ray.cpus_per_worker=0.45", "ray.num_cpus=2", f"ray.storage_path={storage}", *extra,
    ])


def split_instruments(dataset_dir: Path, split: str) -> set[str]:
    manifest = load_manifest(dataset_dir)
    return {str(name) for entry in shard_entries(manifest, split)
            for day in iter_shard_days(dataset_dir, entry, drop_nan_label=True, manifest=manifest)
            for name in day.instruments}


# ---------------------------------------------------------------------------------------------- instrumentation

class RecordingBuilder:
    """A model_builder that records the instruments of every batch the worker's loop draws; the
    first attempt of run `fail_once` fails (before it trains)."""

    def __init__(self, record_dir: Path, fail_once: str = ""):
        self.record_dir = str(record_dir)
        self.fail_once = fail_once

    def __call__(self, model_cfg):
        import fvae_dist.train.loop as loop
        from fvae_dist.models.factorvae import build_model

        run = ray.train.get_context().get_experiment_name()
        marker = Path(self.record_dir) / f"{run}.failed-once"
        if run == self.fail_once and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure on the first attempt")
        path = Path(self.record_dir) / f"{run}.{os.getpid()}.jsonl"
        # training batches come through training_batches (from the feeder actor or in-process),
        # evaluation batches through iter_day_batches
        if not getattr(loop.training_batches, "_records_instruments", False):
            loop.training_batches = _recording(loop.training_batches, path, "train")
            loop.iter_day_batches = _recording(loop.iter_day_batches, path, "eval")
        return build_model(model_cfg)


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
        cfg = load_config(None, ["model.num_features=20", *(f"{k}={v}" for k, v in choice.overrides.items())])
        build_model(cfg.model)  # raises for a name or variant that does not exist


def test_cli_reports_unknown_model_as_an_error(capsys):
    assert cli.main(["robustness", "--m", "5", "--models", "lstm", "--seeds", "1"]) == 2
    assert "lstm" in capsys.readouterr().err


def test_presets_load_and_their_runs_fit_side_by_side():
    from fvae_dist.train.cluster_fit import RunShape, check_fits
    from fvae_dist.tune.grid import TRIAL_DRIVER_CPUS

    presets = Path(__file__).resolve().parents[1] / "tune_configs"
    for name, cpus, side_by_side in (("robustness_tiny.yaml", 2, 2), ("robustness_csi300.yaml", 16, 15)):
        cfg = load_config(presets / name)
        assert not cfg.data.exclude_instruments  # the job draws the held-out stocks itself
        run = RunShape.of(cfg, driver_cpus=TRIAL_DRIVER_CPUS, unit="trial")
        assert check_fits(run, [{"CPU": cpus}]) == side_by_side, name


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
def grid(market_dir, tmp_path_factory, fvae_ray):
    """The real grid (factorvae x m in {4, 8} x 2 seeds), one run failing once and retried."""
    tmp_path = tmp_path_factory.mktemp("grid")
    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "out"
    # ray.max_failures=0: the injected failure fails the trial's training instead of being
    # absorbed by Ray Train restarting its worker group, so that the grid's own retry is what runs
    cfg = tiny_config(market_dir, tmp_path / "unused", "ray.max_failures=0", num_features=20)
    retried = RunSpec("factorvae", 4, 1).name
    messages = []
    summary = run_robustness(cfg, models=["factorvae"], ms=[4, 8], seeds=2, out_dir=out, retries=1,
                             model_builder=RecordingBuilder(records, fail_once=retried), log=messages.append)
    return {"summary": summary, "out": out, "root": out / "robustness", "records": records, "cfg": cfg,
            "messages": messages, "tmp": tmp_path}


@pytest.mark.ray
@pytest.mark.timeout(600)  # the grid's 4 runs, 2 at a time, on a shared, busy 2-core machine
def test_grid_holds_stocks_out_of_training_and_scores_exactly_them(grid, market_dir):
    summary, out, records, cfg, tmp_path = grid["summary"], grid["out"], grid["records"], grid["cfg"], grid["tmp"]
    assert summary.max_parallel == 2  # 2 CPUs, 0.45 + 0.05 per run, 1 kept for Ray Data
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


@pytest.mark.ray
@pytest.mark.timeout(600)  # shares the grid with the test above; alone it pays for it
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


class BrokenScoring(HeldOutScoring):
    """The real held-out scoring, except that it always fails for the runs of seed 1."""

    def __call__(self, name, cfg):
        if name.endswith("-seed1"):
            raise RuntimeError(f"broken scoring of {name}")
        return super().__call__(name, cfg)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_failed_runs_are_retried_recorded_and_tried_again_on_rerun(toy_dir, tmp_path, fvae_ray):
    cfg = tiny_config(toy_dir, tmp_path)
    messages = []
    # the toy data set has no source to re-prepare from: every run shares it, as the flag says
    summary = run_robustness(cfg, models=["factorvae"], ms=[3], seeds=2, out_dir=tmp_path, retries=1,
                             log=messages.append, scoring=BrokenScoring, reuse_normalisation=True)
    root = tmp_path / "robustness"
    assert not (root / "data").exists()
    assert "reuse-normalisation" in json.loads((root / "job.json").read_text())["prepare"]["normalisation"]
    results = summary.results.set_index("seed")
    assert summary.failed == 1 and (summary.ran, summary.skipped) == (2, 0)
    assert results.loc[1, "status"] == "failed" and results.loc[1, "attempts"] == 2  # retried once
    assert "broken scoring of factorvae-m3-seed1" in results.loc[1, "error"]
    assert np.isnan(results.loc[1, "rank_ic"])  # recorded, not dropped, and without a score
    assert results.loc[0, "status"] == "ok" and results.loc[0, "attempts"] == 1
    table_md = (root / "table2.md").read_text()
    assert table_md.count("[1 of 2 failed]") == 2  # Rank IC and Rank ICIR
    table = pd.read_csv(root / "table2.csv")
    assert table["runs_failed"].tolist() == [1] and table["runs_ok"].tolist() == [1]
    assert table["rank_ic_mean"].tolist() == pytest.approx([results.loc[0, "rank_ic"]])  # seed 0 only
    assert json.loads((root / "runs" / "factorvae-m3-seed1" / "robustness.json").read_text())["status"] == "failed"
    assert any("FAILED after 2 attempt(s)" in message for message in messages)

    finished = root / "runs" / "factorvae-m3-seed0"
    stamps = {name: (finished / name).stat().st_mtime_ns for name in ("metrics.json", "trial.json", "config.yaml")}
    # one more seed and no retries: the finished run stays, the failed one is tried once more
    again = run_robustness(cfg, models=["factorvae"], ms=[3], seeds=3, out_dir=tmp_path, retries=0,
                           log=lambda _: None, scoring=BrokenScoring, reuse_normalisation=True)
    assert (again.ran, again.skipped, again.failed) == (2, 1, 1)
    assert {name: (finished / name).stat().st_mtime_ns for name in stamps} == stamps, "seed 0 was run again"
    rows = again.results.set_index("seed")
    assert rows["status"].tolist() == ["ok", "failed", "ok"] and rows.loc[1, "attempts"] == 3
    assert (root / "runs" / "factorvae-m3-seed2" / "predictions" / "test.parquet").is_file()


def _statuses(root: Path) -> dict[str, str]:
    path = root / "results.csv"
    return dict(zip(*[pd.read_csv(path)[c] for c in ("run_dir", "status")])) if path.is_file() else {}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_an_interrupted_job_continues_without_rerunning_finished_runs(toy_dir, tmp_path):
    config = tmp_path / "robustness.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset_dir": str(toy_dir)},
        "model": {"num_features": 4, "seq_len": 5, "hidden_size": 4, "num_factors": 2, "num_portfolios": 4},
        "train": {"epochs": 2, "early_stopping_patience": 0},
        "ray": {"num_workers": 1, "cpus_per_worker": 0.45, "num_cpus": 2},
    }))
    args = ["robustness", "--config", str(config), "--m", "3", "--seeds", "3", "--models", "factorvae",
            "--max-parallel", "2", "--reuse-normalisation", "--out", str(tmp_path)]
    root = tmp_path / "robustness"
    # two runs at a time: when the first one finishes the second is still going and the third
    # has yet to start, so Ctrl+C catches the job in the middle
    first = start_cli(args, tmp_path / "first.log")
    deadline = time.monotonic() + 420
    while "ok" not in _statuses(root).values() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    done = [run for run, status in _statuses(root).items() if status == "ok"]
    assert done, (tmp_path / "first.log").read_text()[-3000:]
    snapshot = {run: ((root / run / "metrics.json").read_text(), read_record(root / run)) for run in done}
    first.send_signal(signal.SIGINT)
    assert wait_for(first, 120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert "pending" in _statuses(root).values()

    second = start_cli(args, tmp_path / "second.log")
    assert wait_for(second, 480) == 0, (tmp_path / "second.log").read_text()[-3000:]
    statuses = _statuses(root)
    assert len(statuses) == 3 and set(statuses.values()) == {"ok"}
    for run, (metrics, record) in snapshot.items():
        assert (root / run / "metrics.json").read_text() == metrics, f"{run} was trained again"
        assert read_record(root / run) == record
    assert "m=3 Rank IC" in (root / "table2.md").read_text()


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
