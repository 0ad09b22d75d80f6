"""`fvae-dist train` / `fvae-dist predict` argument handling that needs no Ray."""
from __future__ import annotations

from pathlib import Path

import yaml

from fvae_dist.cli import main

DEMO = Path(__file__).resolve().parents[2] / "tune_configs" / "demo.yaml"


def test_print_config_shows_the_resolved_overrides(capsys):
    assert main(["train", "--config", str(DEMO), "train.lr=0.01", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.01 and printed["ray"]["cpus_per_worker"] == 0.5


def test_list_keys(capsys):
    assert main(["train", "--list-keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert "train.precision" in keys and "ray.cpus_per_worker" in keys and "model.gamma" in keys


def test_a_typo_is_one_clear_line_not_a_traceback(capsys):
    assert main(["train", "train.epoch=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "train.epoch" in err and "train.epochs" in err and "Traceback" not in err


def test_missing_dataset_is_reported_before_ray_starts(capsys, tmp_path):
    assert main(["train", f"data.dataset_dir={tmp_path / 'nothing'}"]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_predict_on_a_folder_that_is_not_a_run(capsys, tmp_path):
    assert main(["predict", "--run", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
