"""The "compile" path: SFM's time loop through torch.compile computes the eager loop's function."""
from __future__ import annotations

import pytest
import torch

from fvae_dist import accel
from fvae_dist.accel import compiled
from fvae_dist.config import config_from_dict
from fvae_dist.models.registry import build_model


def _sfm(dropout: float = 0.0):
    cfg = config_from_dict({"model": {"name": "sfm", "num_features": 6, "hidden_size": 8, "freq_dim": 3,
                                      "dropout": dropout}})
    torch.manual_seed(0)
    return build_model(cfg.model)


def _step(model, stocks: int, seed: int = 1):
    """Loss and every parameter's gradient of one training step on a day of `stocks` stocks."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, stocks, 5, 6, generator=generator)
    y = torch.randn(1, stocks, generator=generator)
    mask = torch.ones(1, stocks, dtype=torch.bool)
    mask[0, -2:] = False                                               # padding never enters the loop
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)                                               # the dropout masks, when any
    loss = model(x, mask, y)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_compiled_loop_matches_the_eager_one_in_loss_and_gradients_for_every_day_size():
    eager, fast = _sfm(dropout=0.3), _sfm(dropout=0.3)
    assert accel.prepare_model(fast, "compile") is fast
    assert isinstance(fast.recurrence, compiled._CompiledOrEager) and not isinstance(eager.recurrence,
                                                                                      compiled._CompiledOrEager)
    assert fast.state_dict().keys() == eager.state_dict().keys()       # checkpoints are interchangeable
    for stocks in (40, 23, 57):                                        # one compilation serves every size
        loss_eager, grads_eager = _step(eager.train(), stocks)
        loss_fast, grads_fast = _step(fast.train(), stocks)
        torch.testing.assert_close(loss_fast, loss_eager, rtol=1e-5, atol=1e-6)
        for name, grad in grads_eager.items():
            torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():                                              # prediction too (no dropout)
        x, mask = torch.randn(1, 30, 5, 6), torch.ones(1, 30, dtype=torch.bool)
        torch.testing.assert_close(fast.eval().predict(x, mask)[0], eager.eval().predict(x, mask)[0],
                                   rtol=1e-5, atol=1e-6)


def test_only_the_compile_setting_compiles_and_other_models_are_left_alone():
    model = _sfm()
    accel.prepare_model(model, "gru,allocator")
    assert not isinstance(model.recurrence, compiled._CompiledOrEager)
    gru = build_model(config_from_dict({"model": {"name": "gru", "num_features": 6}}).model)
    assert compiled.compile_sfm_loops(gru) == 0


def test_a_failed_compilation_warns_once_and_runs_the_eager_loop(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler\nmore detail")

    model = _sfm()
    model.recurrence = compiled._CompiledOrEager(broken, model.recurrence)
    reference = _sfm()
    with pytest.warns(RuntimeWarning, match="compiling SFM's loop failed .RuntimeError: no C\\+\\+ compiler.; running it eagerly"):
        loss, _ = _step(model, 20)
    torch.testing.assert_close(loss, _step(reference, 20)[0])
    _step(model, 20)                                                   # no second attempt, no second warning
    assert calls == [1]
