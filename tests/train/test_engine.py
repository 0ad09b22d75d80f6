"""train/engine.py pieces that run without Ray."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fvae_dist.train.engine import clip_grad_norm


def _with_grads(scale: float) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 1))
    for p in net.parameters():
        p.grad = scale * torch.randn_like(p)
    net[1].bias.grad = None                                            # a parameter without a gradient
    return net


@pytest.mark.parametrize("grad_scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 3.0)])
def test_clip_grad_norm_matches_torch(grad_scale, max_norm):
    ours, theirs = _with_grads(grad_scale), _with_grads(grad_scale)
    total = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])
    clip_grad_norm(ours.parameters(), max_norm)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if b.grad is None:
            assert a.grad is None
        else:
            assert torch.equal(a.grad, b.grad)
    clipped = float(total) > max_norm
    after = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])
    assert math.isclose(float(after), max_norm if clipped else float(total), rel_tol=1e-5)


def test_clip_grad_norm_poisons_non_finite_gradients_as_torch_does():
    ours = _with_grads(1.0)
    ours[0].weight.grad[0, 0] = float("inf")
    theirs = copy.deepcopy(ours)
    clip_grad_norm(ours.parameters(), 1.0)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
            assert not torch.isfinite(a.grad).all()
