"""train/optim_step.py and native/adamw.cpp: clip-and-step against torch's clip_grad_norm_ and
AdamW(fused=True), on the same state tensors."""
from __future__ import annotations

import copy

import pytest
import torch

from fvae_dist.native import build
from fvae_dist.train.optim_step import NativeAdamW


def _net_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.05, fused=True)


def _set_grads(net, step: int, scale: float):
    gen = torch.Generator().manual_seed(100 + step)
    for p in net.parameters():
        p.grad = scale * torch.randn(p.shape, generator=gen)
    net[2].bias.grad = None if step == 2 else net[2].bias.grad     # one step without this gradient


def _torch_step(net, optimizer, max_norm):
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    optimizer.step()


@pytest.fixture
def lib():
    kernels = build.load_optim_kernels()
    assert kernels is not None, "the native AdamW did not build on this machine"
    return kernels


@pytest.mark.parametrize("grad_scale, max_norm", [(5.0, 1.0), (0.01, 1.0), (1.0, 0.0)])
def test_steps_match_torch_state_and_weights(lib, grad_scale, max_norm):
    ours, our_opt = _net_and_optimizer()
    theirs, their_opt = _net_and_optimizer()
    native = NativeAdamW(our_opt, lib)
    for step in range(6):
        for net in (ours, theirs):
            _set_grads(net, step, grad_scale)
        if step == 4:                                                  # a learning-rate change (schedules)
            for opt in (our_opt, their_opt):
                opt.param_groups[0]["lr"] = 3e-3
        took = native.step(max_norm)
        assert took == (step > 0), "the first step is torch's (it creates the state)"
        if not took:
            _torch_step(ours, our_opt, max_norm)
        _torch_step(theirs, their_opt, max_norm)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        sa, sb = our_opt.state[a], their_opt.state[b]
        assert sa["step"].item() == sb["step"].item() and sa["step"].dtype == sb["step"].dtype
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-10)
    assert our_opt.state[ours[2].bias]["step"].item() == 5             # no gradient, no step


def test_a_non_finite_gradient_is_left_to_torch_untouched(lib):
    net, optimizer = _net_and_optimizer()
    native = NativeAdamW(optimizer, lib)
    _set_grads(net, 0, 1.0)
    _torch_step(net, optimizer, 1.0)
    _set_grads(net, 1, 1.0)
    net[0].weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in net.parameters()]
    assert not native.step(1.0)
    after = optimizer.state_dict(), list(net.parameters())
    for a, b in zip(before[1], after[1]):
        assert torch.equal(a, b)
    assert before[0]["state"][0]["step"] == after[0]["state"][0]["step"]
    assert native.step(0.0)                                            # without clipping it can step


def test_a_checkpointed_state_continues_the_same_under_torch(lib):
    ours, our_opt = _net_and_optimizer()
    theirs, their_opt = _net_and_optimizer()
    native = NativeAdamW(our_opt, lib)
    for step in range(3):
        for net in (ours, theirs):
            _set_grads(net, step, 1.0)
        if not native.step(1.0):
            _torch_step(ours, our_opt, 1.0)
        _torch_step(theirs, their_opt, 1.0)
    resumed, resumed_opt = _net_and_optimizer(seed=9)
    resumed.load_state_dict(ours.state_dict())
    resumed_opt.load_state_dict(our_opt.state_dict())
    for net in (resumed, theirs):
        _set_grads(net, 3, 1.0)
    _torch_step(resumed, resumed_opt, 1.0)
    _torch_step(theirs, their_opt, 1.0)
    for a, b in zip(resumed.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_steps_after_the_state_or_a_parameter_is_replaced_use_the_new_tensors(lib):
    """NativeAdamW keeps the rows it checked; a checkpoint loaded into the running optimizer
    (new state tensors) or a parameter moved to new storage must not be stepped through them."""
    ours, our_opt = _net_and_optimizer()
    theirs, their_opt = _net_and_optimizer()
    native = NativeAdamW(our_opt, lib)
    for step in range(3):                                              # native from step 1: rows kept
        for net in (ours, theirs):
            _set_grads(net, 0, 1.0)
        if not native.step(1.0):
            _torch_step(ours, our_opt, 1.0)
        _torch_step(theirs, their_opt, 1.0)
    for step in range(3, 6):
        if step == 3:
            our_opt.load_state_dict(copy.deepcopy(our_opt.state_dict()))  # same values, new tensors
        if step == 5:
            ours[0].weight.data = ours[0].weight.data.clone()          # same values, new storage
        for net in (ours, theirs):
            _set_grads(net, 0, 1.0)
        assert native.step(1.0)
        _torch_step(theirs, their_opt, 1.0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        sa, sb = our_opt.state[a], their_opt.state[b]
        assert sa["step"].item() == sb["step"].item() == 6
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-10)


def test_the_cpu_engine_steps_natively_and_like_torch(monkeypatch):
    from fvae_dist.config import load_config
    from fvae_dist.models.factorvae import build_model
    from fvae_dist.train.engine import DDPEngine

    cfg = load_config(None, ["model.hidden_size=16", "model.num_factors=3", "model.num_portfolios=5",
                             "model.num_features=4"])
    x = torch.randn(2, 6, 5, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    y = 0.05 * torch.randn(2, 6)
    weights = []
    for disabled in ("1", "0"):
        monkeypatch.setenv(build.DISABLE_OPTIM_ENV, disabled)
        torch.manual_seed(0)
        engine = DDPEngine(build_model(cfg.model), cfg, torch.device("cpu"), world_size=1)
        assert (engine.native_step is not None) == (disabled == "1")
        for _ in range(4):
            torch.manual_seed(1)                                       # the same draws of z_post
            engine.train_step(x, mask, y)
        weights.append([p.detach().clone() for p in engine.module.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
