"""tune/grid.py: what a rerun of a grid does, decided before Ray starts. (The grid's Ray runs
are tested through its first user, the robustness job: tests/test_robustness.py.)"""
from __future__ import annotations

import pytest

from fvae_dist.config import load_config
from fvae_dist.errors import ConfigError
from fvae_dist.tune.grid import fingerprint, read_record, run_grid, write_record
from tests.toy_dataset import TINY_MODEL


def trial_cfg(toy_dir, *extra):
    return load_config(None, [f"data.dataset_dir={toy_dir}", *TINY_MODEL, "train.epochs=1", *extra])


def finished(folder, name, cfg, result):
    """A trial folder as a finished trial leaves it."""
    write_record(folder / name, {"name": name, "status": "ok", "attempts": 1, "config": fingerprint(cfg),
                                 "result": result, "wall_s": 1.5})


def test_a_finished_grid_runs_nothing_and_reports_every_trial(tmp_path, toy_dir):
    trials = {"a-seed0": trial_cfg(toy_dir, "train.seed=0"), "a-seed1": trial_cfg(toy_dir, "train.seed=1")}
    for name, cfg in trials.items():
        finished(tmp_path / "grid", name, cfg, {"score": len(name)})
    updates = []
    outcome = run_grid("grid", tmp_path, trials, on_update=updates.append)
    assert outcome.ran == [] and outcome.concurrency == 0 and not outcome.failed
    assert [t.status for t in outcome.trials.values()] == ["ok", "ok"]
    assert outcome.trials["a-seed1"].result == {"score": 7} and updates == [outcome]


def test_a_trial_started_with_other_settings_is_refused_naming_it(tmp_path, toy_dir):
    finished(tmp_path / "grid", "a-seed0", trial_cfg(toy_dir, "train.lr=0.001"), {})
    with pytest.raises(ConfigError, match=r"a-seed0: trial a-seed0 was started with other settings "
                                          r"\(train.lr: 0.001 -> 0.002\); use another grid name, or delete"):
        run_grid("grid", tmp_path, {"a-seed0": trial_cfg(toy_dir, "train.lr=0.002")})
    # ray.* is not part of it
    outcome = run_grid("grid", tmp_path, {"a-seed0": trial_cfg(toy_dir, "train.lr=0.001", "ray.num_workers=1")})
    assert outcome.trials["a-seed0"].status == "ok" and read_record(tmp_path / "grid" / "a-seed0")["attempts"] == 1


@pytest.mark.parametrize("name", ["", "a/b", "../up", ".hidden", "sp ace"])
def test_trial_names_must_be_plain_folder_names(tmp_path, toy_dir, name):
    with pytest.raises(ConfigError, match="expected a folder name"):
        run_grid("grid", tmp_path, {name: trial_cfg(toy_dir)})


def test_limits_are_checked(tmp_path, toy_dir):
    with pytest.raises(ConfigError, match="at least one trial"):
        run_grid("grid", tmp_path, {})
    with pytest.raises(ConfigError, match=r"max_concurrent=-1: expected an integer >= 0"):
        run_grid("grid", tmp_path, {"a": trial_cfg(toy_dir)}, max_concurrent=-1)


def test_a_setting_added_later_at_its_default_changes_nothing(tmp_path, toy_dir):
    """A trial recorded by an older fvae-dist lacks settings added since: at their defaults they
    do not count as a change (a long grid survives an upgrade), set otherwise they do."""
    cfg = trial_cfg(toy_dir)
    record = fingerprint(cfg)
    del record["config"]["train"]["cpu_kernels"]                 # as if it did not exist back then
    write_record(tmp_path / "grid" / "a-seed0", {"name": "a-seed0", "status": "ok", "attempts": 1, "config": record})
    assert run_grid("grid", tmp_path, {"a-seed0": cfg}).trials["a-seed0"].status == "ok"
    with pytest.raises(ConfigError, match="train.cpu_kernels"):
        run_grid("grid", tmp_path, {"a-seed0": trial_cfg(toy_dir, "train.cpu_kernels=off")})


def test_a_grid_that_tune_stops_before_its_trials_end_says_interrupted(tmp_path, toy_dir, monkeypatch):
    """Ctrl+C makes Tune's fit() return with trials neither finished nor failed: the outcome says
    interrupted (a finished grid does not), and the trials finished before stay as they were."""
    import fvae_dist.tune.grid as grid

    class Stopped:  # what run_experiment returns when Tune was stopped before any trial ended
        results, resumed, concurrency = [], False, 1

    monkeypatch.setattr(grid, "run_experiment", lambda experiment: Stopped())
    trials = {"a-seed0": trial_cfg(toy_dir, "train.seed=0"), "a-seed1": trial_cfg(toy_dir, "train.seed=1")}
    finished(tmp_path / "grid", "a-seed0", trials["a-seed0"], {"score": 1})
    outcome = run_grid("grid", tmp_path, trials)
    assert outcome.interrupted and outcome.ran == ["a-seed1"] and outcome.pending == ["a-seed1"]
    assert outcome.trials["a-seed0"].status == "ok"
    finished(tmp_path / "grid", "a-seed1", trials["a-seed1"], {"score": 2})
    assert not run_grid("grid", tmp_path, trials).interrupted
