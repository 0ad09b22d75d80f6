"""The fast paths' one setting (train.cpu_kernels) and where it is applied."""
from __future__ import annotations

import pytest
import torch

from fvae_dist import accel
from fvae_dist.accel.gru import CPUGRU
from fvae_dist.config import config_from_dict
from fvae_dist.errors import ConfigError
from fvae_dist.models.registry import build_model


def test_settings_select_paths():
    assert accel.enabled_paths("auto") == set(accel.PATHS)
    assert accel.enabled_paths("off") == set()
    assert accel.enabled_paths("gru") == {"gru"}
    assert accel.enabled_paths(" allocator , gru ") == {"gru", "allocator"}


def test_yaml_off_and_on_mean_the_words():
    """A bare `off` in YAML (or key=value) arrives as the boolean false."""
    assert config_from_dict({"train": {"cpu_kernels": False}}).train.cpu_kernels == "off"
    assert config_from_dict({"train": {"cpu_kernels": True}}).train.cpu_kernels == "auto"


def test_an_unknown_path_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"train\.cpu_kernels='fused'.*gru, allocator"):
        config_from_dict({"train": {"cpu_kernels": "fused"}})


def test_models_are_built_with_torch_modules_and_swapped_only_when_asked():
    """models/ never import the fast paths: the built model holds plain nn.GRU modules."""
    cfg = config_from_dict({"model": {"name": "gru", "num_features": 20}})
    model = build_model(cfg.model)
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.GRU)} == {torch.nn.GRU}
    accel.prepare_model(model, "off")
    assert not any(type(m) is CPUGRU for m in model.modules())
    accel.prepare_model(model, "allocator")
    assert not any(type(m) is CPUGRU for m in model.modules())
    accel.prepare_model(model, "gru", device_type="cuda")
    assert not any(type(m) is CPUGRU for m in model.modules())
    accel.prepare_model(model, "auto")
    assert any(type(m) is CPUGRU for m in model.modules())


def test_worker_environment_follows_the_setting():
    assert accel.worker_env_vars("auto") == {"MALLOC_ARENA_MAX": "1"}
    assert accel.worker_env_vars("off") == {}
    assert accel.worker_env_vars("auto", device_type="cuda") == {}


def test_the_model_package_does_not_import_the_fast_paths():
    import ast
    from pathlib import Path

    models = Path(accel.__file__).parents[1] / "models"
    for path in models.rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not any(name and name.startswith("fvae_dist.accel") for name in imported), path
