"""config.py: YAML presets + typed key=value overrides, and the errors a typo gets."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fvae_dist.config import (
    ExperimentConfig,
    all_keys,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    with_overrides,
)
from fvae_dist.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[1] / "tune_configs"


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.ray.cpus_per_worker == 0.5 and cfg.data.batch_days == 1


def test_yaml_then_overrides_are_typed_by_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01, "epochs": 5}, "model": {"hidden_size": 16}}))
    cfg = load_config(
        path,
        [
            "train.lr=1e-3",  # YAML reads 1e-3 as a string; the float field converts it
            "train.epochs=7",
            "ray.cpus_per_worker=0.25",
            "ray.use_gpu=false",
            "train.deepspeed=yes",
            "data.exclude_instruments=[SH600000, SZ000001]",
            "ray.run_name=12",  # a str field keeps digits as text
        ],
    )
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.model.hidden_size == 16
    assert cfg.ray.cpus_per_worker == 0.25
    assert cfg.train.deepspeed is True
    assert cfg.data.exclude_instruments == ("SH600000", "SZ000001")
    assert cfg.ray.run_name == "12"


def test_comma_separated_list_override():
    cfg = load_config(None, ["data.exclude_instruments=SH600000,SZ000001"])
    assert cfg.data.exclude_instruments == ("SH600000", "SZ000001")


@pytest.mark.parametrize(
    "override, nearest",
    [("train.lrr=0.1", "train.lr"), ("ray.num_worker=3", "ray.num_workers"), ("modle.gamma=2", "model.gamma")],
)
def test_unknown_key_names_it_and_the_nearest_valid_key(override, nearest):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert override.split("=")[0] in message and nearest in message


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epoch.*train\.epochs"):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.epochs=2.5", "train.epochs expects an integer"),
        ("train.lr=fast", "train.lr expects a number"),
        ("ray.use_gpu=maybe", "ray.use_gpu expects true or false"),
        ("train.precision=fp8", "train.precision"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
        ("data.batch_days=0", "data.batch_days"),
        ("data.days_per_block=0", "data.days_per_block"),
        ("model.variant=big", "variant"),
        ("train.lr", "KEY=VALUE"),
    ],
)
def test_bad_values_raise_config_error_naming_the_setting(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_fp16_is_refused_without_gpu():
    with pytest.raises(ConfigError, match="fp16.*use_gpu"):
        load_config(None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=fp16", "ray.use_gpu=true"]).train.precision == "fp16"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(None, ["data.exclude_instruments=[A,B]", "train.precision=bf16", "model.num_factors=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_with_overrides_for_programmatic_callers():
    cfg = with_overrides(ExperimentConfig(), {"train.lr": 0.01, "model.hidden_size": 8})
    assert cfg.train.lr == 0.01 and cfg.model.hidden_size == 8
    with pytest.raises(ConfigError, match="train.learning_rate"):
        with_overrides(cfg, {"train.learning_rate": 1})


def test_every_key_is_documented():
    import ast
    import inspect

    import fvae_dist.config as config_module

    tree = ast.parse(inspect.getsource(config_module))
    documented = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for first, second in zip(body, body[1:]):
                if isinstance(first, ast.AnnAssign) and isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant):
                    documented.add(f"{node.name}.{first.target.id}")
    own_sections = {"data": "DataConfig", "train": "TrainConfig", "ray": "RayConfig"}
    for key in all_keys():
        section, name = key.split(".")
        if section in own_sections:
            assert f"{own_sections[section]}.{name}" in documented, f"{key} has no docstring"


def _training_presets() -> list[str]:
    """Presets made only of ExperimentConfig sections (tune/robustness files have their own)."""
    return sorted(p.name for p in PRESETS.glob("*.yaml")
                  if set(yaml.safe_load(p.read_text()) or {}) <= {"data", "model", "train", "ray"})


def test_demo_and_csi300_presets_exist():
    assert {"demo.yaml", "csi300.yaml"} <= set(_training_presets())


@pytest.mark.parametrize("preset", _training_presets())
def test_presets_load(preset):
    cfg = load_config(PRESETS / preset)
    assert cfg.data.dataset_dir
    assert cfg.ray.num_workers * cfg.ray.cpus_per_worker <= 1.0 or preset != "demo.yaml"


def test_num_features_comes_from_the_data_sets_manifest():
    from fvae_dist.config import with_data_features

    manifest = {"features": ["KLEN", "KLOW", "ROC60"], "feature_set": "mine"}
    cfg = load_config(None)
    assert cfg.model.num_features == 0                    # the default: as many as the data set has
    assert with_data_features(cfg, manifest, "ds/manifest.json").model.num_features == 3
    given = load_config(None, ["model.num_features=3"])
    assert with_data_features(given, manifest, "ds/manifest.json") == given
    with pytest.raises(ConfigError, match=r"model\.num_features=20.*ds/manifest\.json lists 3 features.*mine"):
        with_data_features(load_config(None, ["model.num_features=20"]), manifest, "ds/manifest.json")
    with pytest.raises(ConfigError, match="lists no features"):
        with_data_features(cfg, {}, "ds/manifest.json")
    for bad in ("-1", "true", "2.5"):
        with pytest.raises(ConfigError, match=r"model\.num_features"):
            load_config(None, [f"model.num_features={bad}"])


def test_train_refuses_a_num_features_the_data_set_does_not_have_before_ray_starts(capsys, tmp_path):
    from fvae_dist.cli import main
    from tests.toy_dataset import write_toy_dataset

    dataset = write_toy_dataset(tmp_path / "ds", n_features=4)
    assert main(["train", f"data.dataset_dir={dataset}", "model.num_features=20",
                 f"ray.storage_path={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "model.num_features=20" in err and "lists 4 features" in err
    assert not (tmp_path / "runs").exists()
