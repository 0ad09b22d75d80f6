"""models/fused_head.py and native/factor_head.cpp: FactorVAE's fused loss against the reference
modules of models/factorvae.py (FactorVAE._loss), value by value and gradient by gradient, both
ways the fused loss runs: the whole step in one native call through torch's sgemm, and the
products through torch."""
from __future__ import annotations

import shutil

import pytest
import torch

from fvae_dist.models import factorvae as fvae_module
from fvae_dist.models import fused_head
from fvae_dist.models.factorvae import ATTENTION_EPS, FactorVAE, FactorVAEConfig
from fvae_dist.native import build
from tests.models.conftest import record_calls

HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None
OUTPUTS = ("loss", "nll", "kl", "mu_post", "sigma_post", "mu_prior", "sigma_prior")

pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the fused head is unavailable here")


@pytest.fixture(params=["native_products", "torch_products"])
def products(request, monkeypatch):
    """Runs the test with the three products inside the native call, then through torch, and
    checks afterwards that the path asked for is the one that ran."""
    native = request.param == "native_products"
    if native and build.torch_sgemm() is None:
        pytest.skip("this torch exports no sgemm: only the torch-product path exists here")
    monkeypatch.setattr(fused_head, "native_products", native)
    ran = record_calls(monkeypatch, fused_head, "_native_products", "_torch_products")
    yield
    assert ran and set(ran) == {"_" + request.param}, f"expected _{request.param} to run, ran {set(ran)}"


def _model(seed: int = 0, **overrides) -> FactorVAE:
    torch.manual_seed(seed)
    return FactorVAE(FactorVAEConfig(num_features=4, hidden_size=16, num_factors=3, num_portfolios=5, **overrides))


def _head_batch(n_per_day: list[int], hidden: int, n_pad: int, seed: int = 1):
    """e (D, N, H) as the feature extractor hands it over (0 at padding), y 0 at padding, mask."""
    gen = torch.Generator().manual_seed(seed)
    D = len(n_per_day)
    mask = torch.zeros(D, n_pad, dtype=torch.bool)
    for d, n in enumerate(n_per_day):
        mask[d, torch.randperm(n_pad, generator=gen)[:n]] = True          # scattered real slots
    e = torch.where(mask[..., None], torch.randn(D, n_pad, hidden, generator=gen), 0.0)
    y = torch.where(mask, 0.05 * torch.randn(D, n_pad, generator=gen), 0.0)
    return e, mask, y


def _loss_and_grads(model: FactorVAE, loss_fn, e: torch.Tensor, scale: float = 1.0):
    """The loss function's outputs, e's gradient and every parameter's, from the same random draw."""
    model.zero_grad(set_to_none=True)
    e = e.clone().requires_grad_(True)
    torch.manual_seed(123)
    out = loss_fn(e)
    (scale * out["loss"]).backward()
    grads = {"e": e.grad}
    grads.update({name: p.grad for name, p in _head_parameters(model)})
    return {k: out[k].detach() for k in OUTPUTS}, grads


def _head_parameters(model):
    """Every parameter after eq. 4 (the feature extractor does not run here)."""
    return [(name, p) for name, p in model.named_parameters() if not name.startswith("feature_extractor.")]


def _reference(model, mask, y):
    return lambda e: model._loss(e, mask, y)


def _fused(model, mask, y):
    return lambda e: fused_head.fused_loss(model, e, mask, y, ATTENTION_EPS)


def _assert_same(expected: dict, got: dict) -> None:
    for name, want in expected.items():
        assert got[name] is not None, f"{name}: no gradient from the fused loss"
        assert got[name].shape == want.shape, name
        scale = want.abs().max().clamp_min(1e-3)
        assert ((got[name] - want).abs().max() / scale) < 1e-5, f"{name} differs"


def test_the_head_kernel_builds_on_a_machine_with_a_compiler():
    assert build.load_head_kernels() is not None


@pytest.mark.parametrize("training", [True, False])
def test_outputs_and_every_gradient_match_the_reference_modules(one_thread, products, training):
    model = _model().train(training)
    e, mask, y = _head_batch([7, 12, 3], hidden=16, n_pad=15)
    assert fused_head.fused_loss_applies(model, e)
    want_out, want_grads = _loss_and_grads(model, _reference(model, mask, y), e)
    got_out, got_grads = _loss_and_grads(model, _fused(model, mask, y), e)
    _assert_same(want_out, got_out)          # train mode: the same draw of z_post, so the same loss
    _assert_same(want_grads, got_grads)
    assert len(got_grads) == 1 + len(_head_parameters(model)) == 24
    assert torch.equal(got_grads["e"][~mask], torch.zeros_like(got_grads["e"][~mask]))  # nothing at padding


def test_gradients_scale_with_the_incoming_gradient(one_thread, products):
    model = _model().train()
    e, mask, y = _head_batch([9, 4], hidden=16, n_pad=10)
    _, once = _loss_and_grads(model, _fused(model, mask, y), e)
    _, thrice = _loss_and_grads(model, _fused(model, mask, y), e, scale=3.0)
    for name in once:
        torch.testing.assert_close(thrice[name], 3.0 * once[name])


def test_a_head_without_any_positive_cosine_falls_back_to_uniform_weights_in_both(one_thread, products):
    # e >= 0 and head 0's query -(1, ..., 1) through an identity key map: every cosine of head 0
    # is negative, so eq. 14's ratio is 0/0 and the head averages the real stocks
    model = _model(seed=3).train()
    attention = model.predictor.attention
    with torch.no_grad():
        attention.w_key[0] = torch.eye(16)
        attention.query[0] = -1.0
    e, mask, y = _head_batch([6, 11], hidden=16, n_pad=12, seed=4)
    e = e.abs()
    weights = attention.weights(e, mask)
    torch.testing.assert_close(weights[..., 0], mask / mask.sum(dim=1, keepdim=True))  # the fallback is hit
    want_out, want_grads = _loss_and_grads(model, _reference(model, mask, y), e)
    got_out, got_grads = _loss_and_grads(model, _fused(model, mask, y), e)
    _assert_same(want_out, got_out)
    _assert_same(want_grads, got_grads)


def test_factorvae_takes_the_fused_path_only_where_it_applies(one_thread, monkeypatch):
    calls = []
    real = fused_head.fused_loss
    monkeypatch.setattr(fvae_module, "fused_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 5, 6, 4)
    mask = torch.ones(2, 5, dtype=torch.bool)
    y = 0.05 * torch.randn(2, 5)

    model = _model().train()
    model(x, mask, y)["loss"].backward()
    assert len(calls) == 1                                   # training, fp32, CPU: fused
    with torch.no_grad():
        model(x, mask, y)                                    # validation loss: the reference modules
    for variant in ("prior", "port"):
        _model(variant=variant)(x, mask, y)
    monkeypatch.setenv(build.DISABLE_HEAD_ENV, "0")
    model(x, mask, y)
    assert len(calls) == 1


def test_a_training_step_gives_the_same_loss_and_gradients_with_and_without_it(one_thread, products, monkeypatch):
    """The whole model, GRU included: what the fused path changes is only the arithmetic."""
    x = torch.randn(3, 8, 6, 4)
    mask = torch.rand(3, 8) > 0.3
    mask[:, 0] = True
    y = 0.05 * torch.randn(3, 8)
    results = []
    for disabled in ("1", "0"):
        monkeypatch.setenv(build.DISABLE_HEAD_ENV, disabled)
        model = _model(seed=5).train()
        torch.manual_seed(7)
        loss = model(x, mask, y)["loss"]
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
