"""tune/campaign.py: `fvae-dist tune` on the runner: cluster fit, a refused change of campaign,
and an interrupted campaign that is resumed without rerunning its finished trials."""
from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.tune import TrialRow, campaign_from_dict, concurrent_trials, run_campaign, sort_rows
from tests.tune.conftest import campaign, start_cli, wait_for


def spec_of(data: dict):
    return campaign_from_dict(data, source="test.yaml")


def test_cluster_fit_counts_ray_data_cpu_and_gpus(tmp_path, toy_dir):
    spec = spec_of(campaign(tmp_path, toy_dir, max_concurrent_trials=0))
    assert concurrent_trials(spec, [{"CPU": 2}]) == 1  # 0.05 + 0.5 per trial, Ray Data keeps 1 CPU
    assert concurrent_trials(spec, [{"CPU": 16}]) == 3  # as many as fit, at most num_samples
    with pytest.raises(ConfigError, match=r"test.yaml: one trial needs 0.55 CPUs"):
        concurrent_trials(spec, [{"CPU": 1}])
    too_many = spec_of(campaign(tmp_path, toy_dir, max_concurrent_trials=2))
    with pytest.raises(ConfigError, match="at most 1 fit the Ray cluster.*set tune.max_concurrent_trials=1"):
        concurrent_trials(too_many, [{"CPU": 2}])
    gpu = campaign(tmp_path, toy_dir, max_concurrent_trials=0)
    gpu["tune"]["resources"].update(use_gpu=True, num_workers=2)
    gpu = spec_of(gpu)
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        concurrent_trials(gpu, [{"CPU": 64, "GPU": 1}])
    assert concurrent_trials(gpu, [{"CPU": 32, "GPU": 3}, {"CPU": 32, "GPU": 2}]) == 2  # GPUs limit concurrency


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


def test_rows_sort_best_first_with_unscored_trials_last():
    def row(trial_id, score):
        return TrialRow(trial_id, "TERMINATED", "completed", score, {}, 1, 1.0, None, None, "", None)

    rows = [row("a", 0.01), row("b", None), row("c", 0.03), row("d", -0.02)]
    assert [r.trial_id for r in sort_rows(rows, "max")] == ["c", "a", "d", "b"]
    assert [r.trial_id for r in sort_rows(rows, "min")] == ["d", "a", "c", "b"]


def _read_rows(folder: Path) -> list[dict]:
    path = folder / "results.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_interrupted_campaign_resumes_without_rerunning_finished_trials(tmp_path, toy_dir):
    # two trials at a time (2 x 0.5 CPUs leave Ray Data 1 of 2): when the first one ends the second
    # is still running, so the interrupt also catches a trial mid-run, and the third is yet to come
    data = campaign(tmp_path, toy_dir, max_concurrent_trials=2)
    data["tune"]["resources"]["cpus_per_worker"] = 0.45
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump(data))
    folder = tmp_path / "tune" / "exp"

    first = start_cli(["tune", "--config", str(config)], tmp_path / "first.log")
    deadline = time.monotonic() + 420
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
    assert wait_for(first, 120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    interrupted = _read_rows(folder)
    assert len(snapshot) < data["tune"]["num_samples"]
    assert any(r["status"] != "TERMINATED" for r in interrupted) or len(interrupted) < data["tune"]["num_samples"]

    second = start_cli(["tune", "--config", str(config)], tmp_path / "second.log")
    assert wait_for(second, 420) == 0, (tmp_path / "second.log").read_text()[-3000:]
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
        if r["outcome"] == "completed":  # a trial that ran all its epochs has its final scores
            assert r["final_valid_rank_ic"] and list((run / "tensorboard" / "hparams").glob("events.out.tfevents.*"))
