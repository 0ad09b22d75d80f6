"""train/engine.py's DDPEngine on one CPU process (no Ray, no process group)."""
from __future__ import annotations

import copy

import pytest
import torch

from fvae_dist.config import config_from_dict
from fvae_dist.errors import ConfigError
from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig
from fvae_dist.train.engine import DDPEngine


def _config(**train):
    return config_from_dict({"train": {"lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 0.5, **train}})


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 5, 20, generator=generator)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    y = torch.randn(2, 7, generator=generator)
    return x, mask, y


def _model():
    torch.manual_seed(0)
    return FactorVAE(FactorVAEConfig(hidden_size=8, num_factors=3, num_portfolios=6)).eval()


def test_train_step_is_clip_then_adamw():
    """One step equals torch's own recipe: backward, clip_grad_norm_, AdamW (eval mode: no sampling)."""
    cfg = _config()
    engine = DDPEngine(_model(), cfg, torch.device("cpu"), world_size=1)
    engine.module.eval()
    reference = copy.deepcopy(engine.module)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=1e-4)

    x, mask, y = _batch()
    engine.train_step(x, mask, y)
    optimizer.zero_grad()
    reference(x, mask, y)["loss"].backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    optimizer.step()

    assert float(norm) > 0.5  # the clip did bind, so the comparison covers it
    for (name, ours), theirs in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_set_lr_reaches_every_parameter_group():
    engine = DDPEngine(_model(), _config(), torch.device("cpu"), world_size=1)
    engine.set_lr(0.123)
    assert {group["lr"] for group in engine.optimizer.param_groups} == {0.123}


def test_state_round_trip_continues_identically():
    """shared_state/load_state carry AdamW's moments: two engines step identically after a restore."""
    cfg = _config()
    first = DDPEngine(_model(), cfg, torch.device("cpu"), world_size=1)
    first.module.eval()
    first.train_step(*_batch(0))
    second = DDPEngine(copy.deepcopy(first.module), cfg, torch.device("cpu"), world_size=1)
    second.module.eval()
    second.load_state(copy.deepcopy(first.shared_state()), [])
    first.train_step(*_batch(1))
    second.train_step(*_batch(1))
    for a, b in zip(first.module.parameters(), second.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fp16_on_cpu_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="train.precision=fp16"):
        DDPEngine(_model(), _config(precision="fp16"), torch.device("cpu"), world_size=1)
