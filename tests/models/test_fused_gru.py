"""models/fused_gru.py must be torch.nn.GRU with a different backward: same outputs, same
gradients for the input and all four parameter tensors, also through FactorVAE."""
import pytest
import torch

from fvae_dist.models.factorvae import FactorVAE, FactorVAEConfig
from fvae_dist.models.fused_gru import gru_last_hidden


def _gru(input_size=6, hidden=5, seed=0):
    torch.manual_seed(seed)
    gru = torch.nn.GRU(input_size, hidden, batch_first=True)
    with torch.no_grad():  # non-zero biases, so that every bias path is exercised
        gru.bias_ih_l0.normal_()
        gru.bias_hh_l0.normal_()
    return gru


def _params(gru):
    return [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]


@pytest.mark.parametrize("stocks,steps", [(7, 4), (1, 1), (33, 20)])
def test_matches_torch_gru_values_and_gradients(stocks, steps):
    gru = _gru()
    x = torch.randn(stocks, steps, 6, requires_grad=True)
    upstream = torch.randn(stocks, 5)
    expected = gru(x)[1][0]
    got = gru_last_hidden(x, *_params(gru))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads_expected = torch.autograd.grad(expected, [x, *_params(gru)], upstream)
    grads_got = torch.autograd.grad(got, [x, *_params(gru)], upstream)
    for name, e, g in zip(["x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"], grads_expected, grads_got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_gradcheck_in_double():
    gru = _gru(input_size=3, hidden=4).double()
    x = torch.randn(5, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: gru_last_hidden(*args), (x, *_params(gru)))


def test_without_grad_gives_the_same_values():
    gru = _gru()
    x = torch.randn(9, 5, 6)
    with_graph = gru_last_hidden(x, *_params(gru))
    with torch.no_grad():
        without = gru_last_hidden(x, *_params(gru))
    torch.testing.assert_close(without, with_graph.detach(), rtol=0, atol=0)


def test_bf16_autocast_stays_close_and_returns_input_dtypes():
    gru = _gru(input_size=16, hidden=16)
    x = torch.randn(40, 10, 16, requires_grad=True)
    exact = gru_last_hidden(x, *_params(gru))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = gru_last_hidden(x, *_params(gru))
    assert approx.dtype == torch.float32
    assert (approx - exact).abs().max().item() < 0.05  # bf16 matmuls, float32 state
    approx.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in _params(gru))


def test_factorvae_loss_and_gradients_identical_with_either_gru():
    cfg = dict(num_features=4, hidden_size=8, num_factors=3, num_portfolios=5)
    torch.manual_seed(1)
    fused = FactorVAE(FactorVAEConfig(**cfg, fused_gru=True)).eval()
    plain = FactorVAE(FactorVAEConfig(**cfg, fused_gru=False)).eval()
    plain.load_state_dict(fused.state_dict())  # same parameter names: checkpoints load either way
    x = torch.randn(2, 6, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    y = torch.randn(2, 6)
    out_fused, out_plain = fused(x, mask, y), plain(x, mask, y)
    torch.testing.assert_close(out_fused["loss"], out_plain["loss"], rtol=1e-5, atol=1e-6)
    out_fused["loss"].backward()
    out_plain["loss"].backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_rejects_a_non_sequence_input():
    gru = _gru()
    with pytest.raises(ValueError, match=r"\(S, T, I\)"):
        gru_last_hidden(torch.randn(4, 6), *_params(gru))
