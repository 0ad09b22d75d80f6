"""tune.py: campaign YAML checks, cluster fit, ASHA's graceful stop, and an interrupted campaign
that is resumed without rerunning its finished trials."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fvae_dist.cli import main
from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.tune import (
    DECISION_FILE,
    EPOCHS_DONE,
    GracefulASHA,
    TrialRow,
    campaign_from_dict,
    concurrent_trials,
    load_campaign,
    optuna_space,
    read_decision,
    reported_metrics,
    run_campaign,
    sort_rows,
)
from tests.train.toy_dataset import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "tune_configs"
TOY_MODEL = {"model.num_features": 4, "model.seq_len": 5}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("tune_toy") / "dataset")


def campaign(tmp_path: Path, toy_dir: Path, **tune) -> dict:
    """A small, valid campaign on the toy data set (plain data, as read from YAML)."""
    return {
        "base": {"overrides": {"data.dataset_dir": str(toy_dir), **TOY_MODEL, "model.hidden_size": 8,
                               "train.epochs": 2, "train.early_stopping_patience": 0, "ray.num_cpus": 2}},
        "space": {
            "model.num_factors": {"type": "int", "low": 2, "high": 4},
            "model.num_portfolios": {"type": "int", "low": 4, "high": 16, "log": True},
            "model.hidden_size": {"type": "choice", "values": [8, 16]},
            "model.gamma": {"type": "float", "low": 0.1, "high": 10.0, "log": True},
            "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        },
        "tune": {"name": "exp", "storage_path": str(tmp_path / "tune"), "num_samples": 3, "seed": 0,
                 "max_concurrent_trials": 1,
                 "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "driver_cpus": 0.05}, **tune},
    }


def spec_of(data: dict):
    return campaign_from_dict(data, source="test.yaml")


# ----------------------------------------------------------------------------------------------
# The campaign file
# ----------------------------------------------------------------------------------------------

def test_presets_load_and_search_the_paper_hyperparameters(toy_dir):
    tiny = load_campaign(PRESETS / "tune_tiny.yaml", [f"data.dataset_dir={toy_dir}"])
    gpu = load_campaign(PRESETS / "tune_gpu_campaign.yaml")
    for spec in (tiny, gpu):
        keys = {p.key for p in spec.space}
        assert {"model.num_factors", "model.num_portfolios", "model.hidden_size", "model.gamma", "train.lr"} <= keys
        assert next(p for p in spec.space if p.key == "model.gamma").log
        assert spec.tune.metric in reported_metrics() and spec.tune.mode == "max"
    assert tiny.base.data.dataset_dir == str(toy_dir)
    assert not tiny.tune.resources.use_gpu and tiny.tune.resources.cpus_per_worker < 1
    assert concurrent_trials(tiny, {"CPU": 2}) == tiny.tune.max_concurrent_trials  # fits the 2-core CI machine
    assert gpu.tune.resources.use_gpu and gpu.base.ray.use_gpu and gpu.tune.num_samples >= 24
    assert gpu.base.data.dataset_dir.endswith("data/csi300")


def test_overrides_reach_tune_settings_and_the_base_config(tmp_path, toy_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(campaign(tmp_path, toy_dir)))
    spec = load_campaign(path, ["tune.num_samples=7", "tune.resources.cpus_per_worker=0.25", "train.epochs=5"])
    assert spec.tune.num_samples == 7 and spec.tune.resources.cpus_per_worker == 0.25
    assert spec.base.train.epochs == 5 and spec.base.ray.cpus_per_worker == 0.25  # resources become ray.*
    assert Path(spec.base.data.dataset_dir).is_absolute()


def test_optuna_bounds_are_inclusive_and_log_scaled(tmp_path, toy_dir):
    space = optuna_space(spec_of(campaign(tmp_path, toy_dir)).space)
    k = space["model.num_factors"]
    assert (k.low, k.high) == (2, 4)
    assert space["model.gamma"].log and not space["model.num_factors"].log
    assert list(space["model.hidden_size"].choices) == [8, 16]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["space"].update({"model.num_factor": {"type": "int", "low": 2, "high": 4}}),
         "did you mean 'model.num_factors'"),
        (lambda c: c["space"].update({"model.gamma": {"type": "float", "low": 1.0, "high": 1.0}}), "empty range"),
        (lambda c: c["space"].update({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}), "empty range"),
        (lambda c: c["space"].update({"model.hidden_size": {"type": "choice", "values": []}}), "non-empty list"),
        (lambda c: c["space"].update({"model.gamma": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}),
         "log scale needs low > 0"),
        (lambda c: c["space"].update({"model.num_factors": {"type": "int", "low": 0, "high": 4}}),
         "invalid config"),
        (lambda c: c["space"].update({"ray.num_workers": {"type": "int", "low": 1, "high": 2}}), "tune.resources"),
        (lambda c: c["space"].update({"model.gamma": {"type": "float", "lo": 0.1, "high": 1.0}}), "did you mean 'low'"),
        (lambda c: c["tune"].update({"metric": "valid_rank_icc"}), "never reported"),
        (lambda c: c["tune"].update({"mode": "maximum"}), "tune.mode"),
        (lambda c: c["tune"].update({"num_sample": 3}), "did you mean 'num_samples'"),
        (lambda c: c["tune"]["resources"].update({"driver_cpus": 0}), "driver_cpus"),
        (lambda c: c["base"]["overrides"].update({"train.lr": -1}), "train.lr"),
        (lambda c: c["tune"].update({"asha": {"grace_period": 5}}), "grace_period"),
    ],
)
def test_bad_campaigns_are_refused_naming_the_setting(tmp_path, toy_dir, edit, message):
    data = campaign(tmp_path, toy_dir)
    edit(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_of(data)


def test_never_reported_metric_suggests_the_reported_one(tmp_path, toy_dir):
    data = campaign(tmp_path, toy_dir)
    data["tune"]["metric"] = "valid_rank_icc"
    with pytest.raises(ConfigError, match="did you mean 'valid_rank_ic'"):
        spec_of(data)


def test_cli_reports_a_bad_campaign_before_anything_starts(tmp_path, toy_dir, capsys):
    data = campaign(tmp_path, toy_dir)
    data["space"]["model.num_factor"] = data["space"].pop("model.num_factors")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["tune", "--config", str(path)]) == 2
    assert "model.num_factors" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()


# ----------------------------------------------------------------------------------------------
# Cluster fit
# ----------------------------------------------------------------------------------------------

def test_cluster_fit_counts_ray_data_cpu_and_gpus(tmp_path, toy_dir):
    spec = spec_of(campaign(tmp_path, toy_dir, max_concurrent_trials=0))
    assert concurrent_trials(spec, {"CPU": 2}) == 1  # 0.05 + 0.5 per trial, Ray Data keeps 1 CPU
    assert concurrent_trials(spec, {"CPU": 16}) == 3  # as many as fit, at most num_samples
    with pytest.raises(ConfigError, match="one trial needs 0.55 CPUs"):
        concurrent_trials(spec, {"CPU": 1})
    too_many = spec_of(campaign(tmp_path, toy_dir, max_concurrent_trials=2))
    with pytest.raises(ConfigError, match="at most 1 fit: set tune.max_concurrent_trials=1"):
        concurrent_trials(too_many, {"CPU": 2})
    gpu = campaign(tmp_path, toy_dir, max_concurrent_trials=0)
    gpu["tune"]["resources"].update(use_gpu=True, num_workers=2)
    gpu = spec_of(gpu)
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        concurrent_trials(gpu, {"CPU": 64, "GPU": 1})
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 5}) == 2  # GPUs limit concurrency


def test_resuming_with_another_campaign_is_refused(tmp_path, toy_dir):
    first = spec_of(campaign(tmp_path, toy_dir))
    folder = first.experiment_dir
    folder.mkdir(parents=True)
    (folder / "campaign.yaml").write_text(yaml.safe_dump(first.to_dict()))
    (folder / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    changed = campaign(tmp_path, toy_dir)
    changed["space"]["model.gamma"]["high"] = 5.0
    with pytest.raises(ConfigError, match="another campaign.*space.model.gamma.high"):
        run_campaign(spec_of(changed))


# ----------------------------------------------------------------------------------------------
# ASHA's verdicts reach the trial instead of killing it
# ----------------------------------------------------------------------------------------------

def test_graceful_asha_writes_stop_for_the_weak_trial_and_never_kills(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    scheduler = GracefulASHA(experiment_dir=tmp_path, time_attr=EPOCHS_DONE, max_t=3, grace_period=1,
                             reduction_factor=2)
    scheduler.set_search_properties("best_valid_rank_ic", "max")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    decisions = [
        scheduler.on_trial_result(None, trial, {EPOCHS_DONE: 1, "best_valid_rank_ic": score})
        for trial, score in zip(trials, (0.05, 0.06, 0.01))  # ASHA keeps the top half seen so far
    ]
    assert decisions == [TrialScheduler.CONTINUE] * 3
    verdicts = [read_decision(tmp_path / f"trial_{t.trial_id}") for t in trials]
    assert [v["decision"] for v in verdicts] == ["continue", "continue", "stop"]
    assert all(v["epochs_done"] == 1 for v in verdicts)
    # at the last epoch a trial finishes on its own (and gets its final valid/test scores)
    scheduler.on_trial_result(None, trials[0], {EPOCHS_DONE: 3, "best_valid_rank_ic": -1.0})
    assert json.loads((tmp_path / "trial_t0" / DECISION_FILE).read_text())["decision"] == "continue"


def test_rows_sort_best_first_with_unscored_trials_last():
    def row(trial_id, score):
        return TrialRow(trial_id, "TERMINATED", "completed", score, {}, 1, 1.0, None, None, "", None)

    rows = [row("a", 0.01), row("b", None), row("c", 0.03), row("d", -0.02)]
    assert [r.trial_id for r in sort_rows(rows, "max")] == ["c", "a", "d", "b"]
    assert [r.trial_id for r in sort_rows(rows, "min")] == ["d", "a", "c", "b"]


# ----------------------------------------------------------------------------------------------
# End to end: interrupt a running campaign, run the same command again
# ----------------------------------------------------------------------------------------------

def _read_rows(folder: Path) -> list[dict]:
    path = folder / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _driver(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    return subprocess.Popen([sys.executable, "-m", "fvae_dist.cli", "tune", "--config", str(config)],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # our own driver's process group only
        process.wait()
        raise


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_interrupted_campaign_resumes_without_rerunning_finished_trials(tmp_path, toy_dir):
    # two trials at a time (2 x 0.5 CPUs leave Ray Data 1 of 2): when the first one ends the second
    # is still running, so the interrupt also catches a trial mid-run, and the third is yet to come
    data = campaign(tmp_path, toy_dir, max_concurrent_trials=2)
    data["tune"]["resources"]["cpus_per_worker"] = 0.45
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(data))
    folder = tmp_path / "tune" / "exp"

    first = _driver(config, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    finished: list[dict] = []
    while not finished and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        finished = [r for r in _read_rows(folder) if r["status"] == "TERMINATED"]
    assert finished, f"no trial finished; driver log:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    snapshot = {
        r["trial_id"]: ((folder / f"trial_{r['trial_id']}" / "config.yaml").stat().st_mtime_ns,
                        (folder / f"trial_{r['trial_id']}" / "metrics.json").read_text())
        for r in finished
    }
    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the experiment state and stops
    assert _stop(first, 90) == 130, (tmp_path / "first.log").read_text()[-3000:]
    interrupted = _read_rows(folder)
    assert len(snapshot) < data["tune"]["num_samples"]
    assert any(r["status"] != "TERMINATED" for r in interrupted) or len(interrupted) < data["tune"]["num_samples"]

    second = _driver(config, tmp_path / "second.log")
    assert _stop(second, 300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "(continued)" in (tmp_path / "second.log").read_text()

    rows = _read_rows(folder)
    assert len(rows) == data["tune"]["num_samples"]  # the resumed experiment, not a new one
    assert {r["status"] for r in rows} == {"TERMINATED"}
    for trial_id, (config_mtime, metrics) in snapshot.items():
        run = folder / f"trial_{trial_id}"
        assert run.joinpath("config.yaml").stat().st_mtime_ns == config_mtime, f"{trial_id} was started again"
        assert run.joinpath("metrics.json").read_text() == metrics, f"{trial_id} was trained again"

    # sorted by the metric, with hyperparameters, epochs and wall time
    scores = [float(r["best_valid_rank_ic"]) for r in rows if r["best_valid_rank_ic"]]
    assert scores == sorted(scores, reverse=True) and scores
    for r in rows:
        assert r["model.num_factors"] and r["train.lr"] and int(r["epochs"]) >= 1 and float(r["wall_s"]) > 0
    assert "| trial |" in (folder / "results.md").read_text()

    # the best trial's config trains as is, its checkpoint is there, its curves are findable
    best = rows[0]
    best_cfg = load_config(folder / "best_config.yaml")
    assert best_cfg.model.num_factors == int(best["model.num_factors"])
    assert best_cfg.train.lr == pytest.approx(float(best["train.lr"]))
    assert best_cfg.ray.run_name == "exp-best"
    checkpoint = Path((folder / "best_checkpoint.txt").read_text().strip())
    assert checkpoint.parent == folder / f"trial_{best['trial_id']}" and (checkpoint / "state.pt").is_file()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best"]["trial_id"] == best["trial_id"]
    for r in rows:
        run = folder / f"trial_{r['trial_id']}"
        assert list((run / "tensorboard").glob("events.out.tfevents.*")), f"no training events for {r['trial_id']}"
        assert list(run.glob("events.out.tfevents.*")), f"no Tune (hparams) events for {r['trial_id']}"
        if r["outcome"] == "completed":
            assert list((run / "tensorboard" / "hparams").glob("events.out.tfevents.*"))
