"""tune/spec.py: a campaign YAML is checked before anything starts, with config.py's rules."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fvae_dist.cli import main
from fvae_dist.errors import ConfigError
from fvae_dist.tune import campaign_from_dict, concurrent_trials, load_campaign, optuna_space, reported_metrics
from tests.tune.conftest import REPO, campaign

PRESETS = REPO / "tune_configs"


def spec_of(data: dict):
    return campaign_from_dict(data, source="test.yaml")


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
    assert concurrent_trials(tiny, [{"CPU": 2}]) == tiny.tune.max_concurrent_trials  # fits the 2-core CI machine
    assert gpu.tune.resources.use_gpu and gpu.base.ray.use_gpu and gpu.tune.num_samples >= 24
    assert gpu.base.data.dataset_dir.endswith("data/csi300")


def test_overrides_reach_tune_settings_and_the_base_config(tmp_path, toy_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(campaign(tmp_path, toy_dir)))
    spec = load_campaign(path, ["tune.num_samples=7", "tune.resources.cpus_per_worker=0.25", "train.epochs=5",
                                "tune.resources.use_gpu=no"])
    assert spec.tune.num_samples == 7 and spec.tune.resources.cpus_per_worker == 0.25
    assert spec.base.train.epochs == 5 and spec.base.ray.cpus_per_worker == 0.25  # resources become ray.*
    assert spec.tune.resources.use_gpu is False
    assert Path(spec.base.data.dataset_dir).is_absolute()
    # trial actors run in their own folders: a relative membership file is made absolute too
    weighted = load_campaign(path, ["train.index_share=0.5", "train.index_membership=members.csv"])
    assert weighted.base.train.index_membership == str(Path.cwd() / "members.csv")


def test_booleans_follow_the_train_configs_rules(tmp_path, toy_dir):
    # "yes" is true in a train preset (config.py), and so in a campaign: one set of rules
    data = campaign(tmp_path, toy_dir)
    data["tune"]["resources"]["use_gpu"] = "yes"
    data["space"]["train.lr"]["log"] = "no"
    spec = spec_of(data)
    assert spec.tune.resources.use_gpu is True and spec.base.ray.use_gpu is True
    assert next(p for p in spec.space if p.key == "train.lr").log is False
    data["tune"]["resources"]["use_gpu"] = "maybe"
    with pytest.raises(ConfigError, match=r"test.yaml: tune.resources.use_gpu expects true or false, got 'maybe'"):
        spec_of(data)


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
        (lambda c: c["space"].update({"model.num_factors": {"type": "int", "low": 1.5, "high": 4}}),
         "space.model.num_factors.low: expected an integer"),
        (lambda c: c["space"].update({"ray.num_workers": {"type": "int", "low": 1, "high": 2}}), "tune.resources"),
        (lambda c: c["space"].update({"model.gamma": {"type": "float", "lo": 0.1, "high": 1.0}}), "did you mean 'low'"),
        (lambda c: c["tune"].update({"metric": "valid_rank_icc"}), "never reported"),
        (lambda c: c["tune"].update({"mode": "maximum"}), "tune.mode"),
        (lambda c: c["tune"].update({"num_sample": 3}), "did you mean 'tune.num_samples'"),
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


def test_a_missing_or_broken_campaign_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: campaign file not found"):
        load_campaign(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: expected a mapping of sections \['base', 'space', 'tune'\]"):
        load_campaign(broken)


def test_cli_reports_a_bad_campaign_before_anything_starts(tmp_path, toy_dir, capsys):
    data = campaign(tmp_path, toy_dir)
    data["space"]["model.num_factor"] = data["space"].pop("model.num_factors")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["tune", "--config", str(path)]) == 2
    assert "model.num_factors" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()
