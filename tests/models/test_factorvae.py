"""FactorVAE: each equation's property, padding invariance, no look-ahead, variants, bf16, learning."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fvae_dist.errors import ConfigError
from fvae_dist.models import VARIANTS, FactorVAE, FactorVAEConfig, build_model
from fvae_dist.models.factorvae import gaussian_kl, gaussian_nll
from tests.models.batches import assert_rejects_bad_batches, make_batch, train_on_random_days, widen_batch

SMALL = FactorVAEConfig(num_features=4, seq_len=5, hidden_size=12, num_factors=3, num_portfolios=6)


def small_model(variant: str = "factorvae", seed: int = 0, **overrides) -> FactorVAE:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(SMALL, variant=variant, **overrides)).eval()


# ---------------------------------------------------------------------------------------------
# config and inputs
# ---------------------------------------------------------------------------------------------

def test_config_defaults_match_the_documented_ones():
    cfg = FactorVAEConfig()
    assert (cfg.num_features, cfg.seq_len, cfg.hidden_size, cfg.num_factors, cfg.num_portfolios) == (20, 20, 64, 8, 64)
    assert (cfg.leaky_slope, cfg.gamma, cfg.variant, cfg.sigma_floor) == (0.1, 1.0, "factorvae", 1e-6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("num_factors", True), ("num_portfolios", 2.5), ("num_features", -1),
    ("gamma", -0.1), ("leaky_slope", 1.0), ("sigma_floor", 0.0), ("port_ridge", float("nan")),
    ("variant", "factorvae-full"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"FactorVAEConfig.{field}"):
        FactorVAEConfig(**{field: value})


def test_bad_batches_raise_data_error_naming_the_input():
    model = small_model()
    assert_rejects_bad_batches(model)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

def test_shapes_and_zero_padding():
    model = small_model()
    x, mask, y = make_batch([7, 4, 2])
    out = model(x, mask, y)
    for key in ("loss", "nll", "kl"):
        assert out[key].shape == () and torch.isfinite(out[key])
    for key in ("mu_post", "sigma_post", "mu_prior", "sigma_prior"):
        assert out[key].shape == (3, SMALL.num_factors)
    assert (out["sigma_post"] > 0).all() and (out["sigma_prior"] > 0).all()

    mu, sigma = model.predict(x, mask)
    assert mu.shape == sigma.shape == (3, 7)
    assert (mu[~mask] == 0).all() and (sigma[~mask] == 0).all()
    assert (sigma[mask] > 0).all() and torch.isfinite(mu).all()

    beta = model.factor_exposures(x, mask)
    assert beta.shape == (3, 7, SMALL.num_factors)
    assert (beta[~mask] == 0).all()


def test_prediction_composes_eq12_from_prior_factors():
    model = small_model()
    x, mask, _ = make_batch([6, 4])
    e = model.feature_extractor(x, mask)
    mu_prior, sigma_prior = model.predictor(e, mask)
    mu_alpha, sigma_alpha = model.decoder.alpha(e)
    beta = model.decoder.beta(e)
    expected_mu = mu_alpha + (beta * mu_prior[:, None]).sum(-1)
    expected_sigma = (sigma_alpha**2 + (beta**2 * sigma_prior[:, None] ** 2).sum(-1)).sqrt()
    mu, sigma = model.predict(x, mask)
    torch.testing.assert_close(mu[mask], expected_mu[mask])
    torch.testing.assert_close(sigma[mask], expected_sigma[mask])


# ---------------------------------------------------------------------------------------------
# eq. 14: attention weights
# ---------------------------------------------------------------------------------------------

def test_attention_weights_follow_eq14():
    model = small_model()
    attention = model.predictor.attention
    gen = torch.Generator().manual_seed(1)
    e = torch.randn(2, 9, SMALL.hidden_size, generator=gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    e[1, 5:] = 1e6  # padded features must not matter

    a = attention.weights(e, mask)
    assert a.shape == (2, 9, SMALL.num_factors)
    assert (a >= 0).all()
    assert (a[~mask] == 0).all()
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, SMALL.num_factors))

    # reference: eq. 14 head by head, written the plain way
    for d in range(2):
        real = e[d, mask[d]]
        for head in range(SMALL.num_factors):
            k = real @ attention.w_key[head].T
            q = attention.query[head]
            cos = (k @ q) / (k.norm(dim=-1) * q.norm())
            expected = cos.clamp_min(0) / cos.clamp_min(0).sum()
            torch.testing.assert_close(a[d, mask[d], head], expected)


def test_attention_weights_all_nonpositive_fall_back_to_uniform_with_finite_gradients():
    model = small_model()
    attention = model.predictor.attention
    H = SMALL.hidden_size
    with torch.no_grad():
        attention.w_key.copy_(torch.eye(H).expand_as(attention.w_key))
        attention.query.fill_(-1.0)
    e = torch.ones(1, 6, H, requires_grad=True)  # k_i = e_i = 1, q = -1: cos = -1 for every stock
    mask = torch.tensor([[True, True, True, True, False, False]])

    a = attention.weights(e, mask)
    expected = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0, 0.0])[:, None].expand(6, SMALL.num_factors)
    torch.testing.assert_close(a[0], expected)
    attention(e, mask).sum().backward()
    assert torch.isfinite(e.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attention.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# eqs. 6-7: portfolio layer; FactorVAE-port's least-squares portfolios
# ---------------------------------------------------------------------------------------------

def test_portfolio_weights_sum_to_one_over_real_stocks():
    model = small_model()
    layer = model.encoder.portfolios
    gen = torch.Generator().manual_seed(2)
    e = torch.randn(2, 8, SMALL.hidden_size, generator=gen)
    y = torch.randn(2, 8, generator=gen)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 3:] = False
    y = torch.where(mask, y, 0.0)

    a_p = layer.weights(e, mask)
    assert a_p.shape == (2, 8, SMALL.num_portfolios)
    assert (a_p >= 0).all() and (a_p[~mask] == 0).all()
    torch.testing.assert_close(a_p.sum(dim=1), torch.ones(2, SMALL.num_portfolios))
    torch.testing.assert_close(layer(e, y, mask), torch.einsum("dn,dnm->dm", y, a_p))


def test_port_variant_portfolios_are_the_least_squares_solution():
    model = small_model("port", port_ridge=1e-7)
    gen = torch.Generator().manual_seed(3)
    H = SMALL.hidden_size
    e = torch.randn(2, 40, H, generator=gen)
    y = torch.randn(2, 40, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    e = torch.where(mask[..., None], e, 0.0)  # the feature extractor zeroes padded e
    y = torch.where(mask, y, 0.0)

    y_p = model.encoder.portfolios(e, y, mask)
    assert y_p.shape == (2, H)
    for d in range(2):
        real_e, real_y = e[d, mask[d]].double(), y[d, mask[d]].double()
        expected = torch.linalg.lstsq(real_e, real_y[:, None]).solution[:, 0]
        torch.testing.assert_close(y_p[d].double(), expected, rtol=1e-4, atol=1e-5)


def test_port_variant_stays_finite_when_fewer_stocks_than_hidden_units():
    model = small_model("port")
    x, mask, y = make_batch([3, 2])  # N < H: e^T e is singular without the ridge
    out = model.train()(x, mask, y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# eq. 17: NLL and KL
# ---------------------------------------------------------------------------------------------

def test_nll_is_the_masked_mean_gaussian_log_prob():
    gen = torch.Generator().manual_seed(4)
    y, mu = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    sigma = torch.rand(3, 10, generator=gen) + 0.1
    mask = torch.rand(3, 10, generator=gen) > 0.3
    mask[:, 0] = True
    sigma = torch.where(mask, sigma, 0.0)  # the decoder's padded slots
    y = torch.where(mask, y, float("nan"))

    nll = gaussian_nll(torch.where(mask, y, 0.0), mu, sigma, mask)
    for d in range(3):
        real = mask[d]
        expected = -Normal(mu[d, real], sigma[d, real]).log_prob(y[d, real]).mean()
        torch.testing.assert_close(nll[d], expected)


def test_kl_closed_form_matches_torch_and_monte_carlo():
    gen = torch.Generator().manual_seed(5)
    mu_q, mu_p = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    sigma_q = torch.rand(2, 4, generator=gen) + 0.3
    sigma_p = torch.rand(2, 4, generator=gen) + 0.3
    kl = gaussian_kl(mu_q, sigma_q, mu_p, sigma_p)

    q, p = Normal(mu_q, sigma_q), Normal(mu_p, sigma_p)
    torch.testing.assert_close(kl, kl_divergence(q, p).sum(-1))
    torch.manual_seed(0)
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(kl, monte_carlo, rtol=0.03, atol=0.03)


def test_loss_is_nll_plus_gamma_kl_and_sampling_only_in_train_mode():
    model = small_model(gamma=0.5)
    x, mask, y = make_batch([6, 5])
    out = model(x, mask, y)
    torch.testing.assert_close(out["loss"], out["nll"] + 0.5 * out["kl"])
    torch.testing.assert_close(model(x, mask, y)["loss"], out["loss"])  # eval: posterior mean

    model.train()
    first, second = model(x, mask, y), model(x, mask, y)
    assert not torch.equal(first["nll"], second["nll"])  # z_post is a fresh sample each call
    first["loss"].backward()
    assert model.encoder.post_sigma.weight.grad.abs().sum() > 0  # reparameterisation reaches sigma_post


# ---------------------------------------------------------------------------------------------
# padding invariance and no look-ahead
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e30])
def test_a_day_gives_the_same_outputs_alone_or_batched_and_padded(variant, garbage):
    model = small_model(variant)
    sizes = [6, 9, 3]
    x, mask, y = make_batch(sizes, seed=7)  # padded to 9 with garbage
    x_wide, mask_wide, y_wide, slots = widen_batch(x, mask, y, garbage)

    batched = model(x_wide, mask_wide, y_wide)
    mu_b, sigma_b = model.predict(x_wide, mask_wide)
    beta_b = model.factor_exposures(x_wide, mask_wide)
    assert torch.isfinite(mu_b).all() and torch.isfinite(sigma_b).all()
    losses = []
    for d, n in enumerate(sizes):
        real_b = slots if d == 0 else torch.arange(n)
        alone = model(x[d:d + 1, :n], mask[d:d + 1, :n], y[d:d + 1, :n])
        losses.append(alone["loss"])
        for key in ("mu_prior", "sigma_prior", "mu_post", "sigma_post"):
            if key in alone:
                torch.testing.assert_close(batched[key][d], alone[key][0], rtol=1e-5, atol=1e-6)
        mu, sigma = model.predict(x[d:d + 1, :n], mask[d:d + 1, :n])
        torch.testing.assert_close(mu_b[d, real_b], mu[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sigma_b[d, real_b], sigma[0], rtol=1e-5, atol=1e-6)
        beta = model.factor_exposures(x[d:d + 1, :n], mask[d:d + 1, :n])
        torch.testing.assert_close(beta_b[d, real_b], beta[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched["loss"], torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_padded_batches_reach_the_gru_with_only_their_real_stocks():
    model = small_model()
    seen = []
    hook = model.feature_extractor.gru.register_forward_hook(lambda gru, inputs, output: seen.append(inputs[0]))
    x, mask, y = make_batch([6, 9, 3], seed=7)                 # 18 real stocks, padded to 9 a day
    model(x, mask, y)
    x1, mask1, y1 = make_batch([9], seed=7)                    # one day: no padding, no gather
    model(x1, mask1, y1)
    hook.remove()
    padded, single = seen
    assert padded.shape[0] == 18 and single.shape[0] == 9
    assert torch.isfinite(padded).all()                        # the NaN padding never entered


def test_a_day_of_thousands_of_stocks_is_exact_and_memory_linear_in_n():
    """A day of the paper's universe (all A-shares: up to ~3,900 stocks): float32 loss and
    prediction agree with a float64 copy of the same model (whose feature extractor and layers
    run in float64; the distributions are float32 by design), the portfolio (eq. 6) and attention
    (eq. 14) weights still sum to one, and nothing saved for backward grows like N^2."""
    N = 4000
    cfg = dataclasses.replace(SMALL, num_features=20, seq_len=20, hidden_size=16, num_factors=4, num_portfolios=16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    exact = build_model(cfg).double().eval()
    exact.load_state_dict(model.state_dict())
    x, mask, y = make_batch([N - 300, N], T=20, C=20, seed=3)  # two days, one padded by 300 slots

    largest = [0]

    def pack(tensor):
        largest[0] = max(largest[0], tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, mask, y)
    out["loss"].backward()
    # every saved activation is at most (stocks x T x a few H): linear in N, never (N, N)
    assert largest[0] <= 2 * N * cfg.seq_len * 3 * cfg.hidden_size
    out64 = exact(x.double(), mask, y.double())
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].double(), out64["loss"].double(), rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        mu, sigma = model.predict(x, mask)
        mu64, sigma64 = exact.predict(x.double(), mask)
        torch.testing.assert_close(mu.double(), mu64.double(), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(sigma.double(), sigma64.double(), rtol=1e-3, atol=1e-5)
        e = model.feature_extractor(x, mask)
        portfolio = model.encoder.portfolios.weights(e, mask)          # (D, N, M)
        attention = model.predictor.attention.weights(e, mask)         # (D, N, K)
    for weights in (portfolio, attention):
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, weights.shape[-1]), rtol=0, atol=1e-5)
        assert not weights[~mask].any()                                # nothing on padded slots


def test_padding_garbage_gives_finite_gradients():
    model = small_model().train()
    x, mask, y = make_batch([6, 2], garbage=float("nan"))
    model(x, mask, y)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_future_returns_reach_the_posterior_but_never_the_prior_or_prediction():
    model = small_model()
    x, mask, y = make_batch([8, 5], seed=8)
    other_y = torch.randn_like(y) * 3
    first, second = model(x, mask, y), model(x, mask, other_y)
    assert not torch.allclose(first["mu_post"], second["mu_post"])  # the encoder does read y
    torch.testing.assert_close(first["mu_prior"], second["mu_prior"], rtol=0, atol=0)
    torch.testing.assert_close(first["sigma_prior"], second["sigma_prior"], rtol=0, atol=0)


def test_predict_never_calls_the_encoder():
    model = small_model()
    x, mask, _ = make_batch([8, 5], seed=9)
    mu, sigma = model.predict(x, mask)

    with torch.no_grad():
        for p in model.encoder.parameters():
            p.fill_(float("nan"))
    mu_nan, sigma_nan = model.predict(x, mask)
    torch.testing.assert_close(mu_nan, mu, rtol=0, atol=0)
    torch.testing.assert_close(sigma_nan, sigma, rtol=0, atol=0)

    del model.encoder
    mu_gone, sigma_gone = model.predict(x, mask)
    torch.testing.assert_close(mu_gone, mu, rtol=0, atol=0)
    torch.testing.assert_close(sigma_gone, sigma, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# variants and mixed precision
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_train_and_predict(variant):
    model = small_model(variant).train()
    x, mask, y = make_batch([6, 4], seed=10)
    out = model(x, mask, y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if variant == "prior":
        assert model.encoder is None and "mu_post" not in out
        assert out["kl"] == 0 and torch.equal(out["loss"], out["nll"])
    else:
        assert out["kl"] > 0
    mu, sigma = model.predict(x, mask)
    assert torch.isfinite(mu).all() and (sigma[mask] > 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_forward_backward(variant):
    model = small_model(variant).train()
    x, mask, y = make_batch([30, 20], seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask, y)
        mu, sigma = model.predict(x, mask)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert mu.dtype == sigma.dtype == torch.float32
    out["loss"].backward()
    for p in model.parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------
# learning sanity check on a toy factor market
# ---------------------------------------------------------------------------------------------

def toy_factor_market(days: int, gen: torch.Generator, N: int = 48, T: int = 5, C: int = 4):
    """y = beta(x) f + noise; beta = the last step's first two features, f has a non-zero premium."""
    x = torch.randn(days, N, T, C, generator=gen)
    beta = x[:, :, -1, :2]
    premium = torch.tensor([1.0, -0.5])
    f = premium + 0.3 * torch.randn(days, 2, generator=gen)
    y = (beta * f[:, None, :]).sum(-1) + 0.3 * torch.randn(days, N, generator=gen)
    return x, torch.ones(days, N, dtype=torch.bool), y


def test_a_few_hundred_adam_steps_learn_a_toy_factor_market():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(12)
    cfg = FactorVAEConfig(num_features=4, seq_len=5, hidden_size=16, num_factors=2, num_portfolios=8)
    model = build_model(cfg)
    x_train, mask_train, y_train = toy_factor_market(64, gen)
    x_test, mask_test, y_test = toy_factor_market(16, gen)

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(x_test, mask_test, y_test)["loss"].item()

    loss_before = held_out_loss()
    train_on_random_days(model, x_train, mask_train, y_train, steps=300, lr=3e-3, gen=gen)
    loss_after = held_out_loss()

    with torch.no_grad():
        mu_pred, _ = model.predict(x_test, mask_test)
    centred_mu = mu_pred - mu_pred.mean(dim=1, keepdim=True)
    centred_y = y_test - y_test.mean(dim=1, keepdim=True)
    daily_ic = (centred_mu * centred_y).sum(1) / (centred_mu.norm(dim=1) * centred_y.norm(dim=1))
    # untrained ~2.6 -> trained ~0.8, IC ~0.9 (measured); the bounds leave wide room
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    assert daily_ic.mean() > 0.5, daily_ic
    assert math.isfinite(loss_after)


def test_bf16_weights_without_autocast_still_give_a_float32_loss():
    # DeepSpeed's bf16 mode casts the parameters themselves and feeds float32 batches.
    model = small_model().to(torch.bfloat16).train()
    x, mask, y = make_batch([10, 7], seed=13)
    out = model(x, mask, y)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
