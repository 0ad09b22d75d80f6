"""FactorVAE (Duan et al., AAAI 2022), equation by equation.

Paper section                         -> code
  Feature Extractor, eq. 4            -> FeatureExtractor
  Factor Encoder, eqs. 5-8            -> PortfolioLayer (eqs. 6-7), LeastSquaresPortfolios (the
                                         "FactorVAE-port" variant), FactorEncoder (eqs. 5, 8)
  Factor Decoder, eqs. 9-12           -> AlphaLayer (eq. 10), BetaLayer (eq. 11), FactorDecoder (eqs. 9, 12)
  Factor Predictor, eqs. 13-16        -> GlobalAttention (eqs. 14-15), FactorPredictor (eqs. 13, 16)
  Objective Function, eq. 17          -> gaussian_nll, gaussian_kl, FactorVAE.forward
  Prediction, eqs. 18-19              -> FactorVAE.predict
  Variants (Experiments 1-2)          -> FactorVAEConfig.variant: "factorvae", "prior", "port"

Batches: one sample is one trading day with all its stocks. D days are padded to the largest
N with a stock mask:  x (D, N, T, C) float,  mask (D, N) bool,  y (D, N) float.
Padded slots never reach a number that a real stock's output depends on: the GRU only runs on
real sequences, y is zeroed there, and every sum over stocks (portfolio softmax, attention,
loss) is restricted to the mask. So a day's outputs do not depend on which other days share
its batch, nor on what the padded slots hold.

Shape letters: D days, N stocks (padded), T time steps, C characteristics, H hidden size,
K factors (= attention heads), M portfolios.

Numerics: every standard deviation is Softplus(.) + sigma_floor, so log(sigma) and 1/sigma^2
stay finite; distributions and the loss are computed in float32 even under bf16 autocast.

Mixed precision: under autocast only the feature extractor (eq. 4, the GRU over S*T rows: nearly
all of the FLOPs) runs its products in bf16/fp16. Everything after it (eqs. 5-19) runs with
autocast off, in the parameters' dtype: those are (N, H) x (H, H) products too small for bf16 to
pay for the casts around them, and the softmax over thousands of stocks (eq. 6), the attention
sums (eq. 14) and the likelihoods (eq. 17) keep float32's precision.

This file is what training runs. Optional CPU fast paths (fvae_dist/accel/) may swap a module
for an equivalent one after the model is built; nothing here imports them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvae_dist.errors import ConfigError, DataError

VARIANTS = ("factorvae", "prior", "port")

# Below this total positive cosine similarity a head's eq. 14 weights are 0/0 (or a division by
# a value so small that the gradient explodes); such a head falls back to uniform weights.
ATTENTION_EPS = 1e-12

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FactorVAEConfig:
    """Hyper-parameters of FactorVAE. The paper states none of the sizes; defaults are ours."""

    num_features: int = 20
    """C: characteristics per stock and time step (the paper uses Qlib's 20 Alpha158 features)."""

    seq_len: int = 20
    """T: look-back length (paper: T = 20). Informational only: the GRU accepts any T."""

    hidden_size: int = 64
    """H: size of h_proj, the GRU state e, h_alpha, the attention keys/values and h_prior.
    64 is the usual size for Qlib's GRU baseline on the same 20 features."""

    num_factors: int = 8
    """K: latent factors, which is also the number of attention heads (eq. 15). A handful of
    factors is the classical factor-model regime (Fama-French: 3-5); 8 leaves some room."""

    num_portfolios: int = 64
    """M: portfolios built by the encoder's portfolio layer (eqs. 6-7). M = H keeps the encoder's
    input the same size as in the "port" variant, where M = H is forced; ignored for "port"."""

    leaky_slope: float = 0.1
    """zeta: negative slope of every LeakyReLU (eqs. 4, 10, 16). 0.1 rather than torch's 0.01 so
    that negative pre-activations keep a usable gradient."""

    gamma: float = 1.0
    """Weight of KL(posterior || prior) in eq. 17. Eq. 17 averages the NLL over the day's N stocks
    but not the KL, so the plain ELBO would be gamma = 1/N; 1.0 (the paper states no value) weighs
    the KL N times more and in practice collapses the posterior onto the prior (KL about 2e-5 on
    CSI300; README, "Real data"). Unused by "prior"."""

    variant: str = "factorvae"
    """"factorvae": the full model. "prior": FactorVAE-prior, no encoder and no KL; trained on the
    NLL of y under the decoder given the prior factors. "port": FactorVAE-port, the encoder's
    portfolios are the cross-sectional least-squares coefficients y_p = (e^T e)^-1 e^T y."""

    sigma_floor: float = 1e-6
    """Added to every Softplus standard deviation (alpha, posterior, prior) so that the NLL and
    KL stay finite when a Softplus underflows to 0. Far below any return scale, so it never
    binds in practice."""

    port_ridge: float = 1e-4
    """"port" only: ridge added to e^T e before solving, relative to its mean diagonal (so it is
    scale-free). Keeps the solve defined when N < H or hidden units are collinear."""

    def __post_init__(self) -> None:
        for name in ("num_features", "seq_len", "hidden_size", "num_factors", "num_portfolios"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FactorVAEConfig.{name}: expected a positive integer, got {value!r}")
        for name, low_ok in (("leaky_slope", True), ("gamma", True), ("sigma_floor", False), ("port_ridge", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"FactorVAEConfig.{name}: expected a finite number, got {value!r}")
            if value < 0 or (value == 0 and not low_ok):
                bound = ">= 0" if low_ok else "> 0"
                raise ConfigError(f"FactorVAEConfig.{name}: expected {bound}, got {value!r}")
        if self.leaky_slope >= 1:
            raise ConfigError(f"FactorVAEConfig.leaky_slope: expected a negative slope in [0, 1), got {self.leaky_slope!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"FactorVAEConfig.variant: expected one of {VARIANTS}, got {self.variant!r}")


# ----------------------------------------------------------------------------------------------
# Small shared pieces
# ----------------------------------------------------------------------------------------------

def positive_std(pre_activation: Tensor, floor: float) -> Tensor:
    """Softplus(.) + floor, in float32: the std heads of eqs. 8, 10 and 16."""
    return F.softplus(pre_activation.float()) + floor


def reparameterise(mu: Tensor, sigma: Tensor, sample: bool) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) (Kingma and Welling 2013); the mean when not sampling,
    which makes evaluation-mode losses deterministic."""
    if not sample:
        return mu
    return mu + sigma * torch.randn_like(sigma)


def masked_mean_over_stocks(values: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """(D, N) -> (D,): mean over each day's real stocks; with `weight` (D, N), the weighted mean
    sum_i w_i v_i / sum_i w_i over them (beyond the paper: train.index_share)."""
    if weight is None:
        total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
        return total / mask.sum(dim=1).clamp_min(1).to(total.dtype)
    weight = torch.where(mask, weight.to(values.dtype), torch.zeros_like(values))
    total = (weight * torch.where(mask, values, torch.zeros_like(values))).sum(dim=1)
    return total / weight.sum(dim=1).clamp_min(torch.finfo(values.dtype).tiny)


# ----------------------------------------------------------------------------------------------
# Feature extractor, eq. 4
# ----------------------------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """e = phi_feat(x): linear projection + LeakyReLU, then a GRU; e is the last hidden state."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.num_features, cfg.hidden_size)
        self.act = nn.LeakyReLU(cfg.leaky_slope)
        self.gru = nn.GRU(cfg.hidden_size, cfg.hidden_size, batch_first=True)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        D, N = mask.shape
        # One GRU call over the real stocks of all days (S = mask.sum() sequences): padded
        # slots cost nothing and whatever they hold never enters the network.
        # Without padding (one day per step) no gather/scatter is needed.
        unpadded = bool(mask.all())
        x_real = x.flatten(0, 1) if unpadded else x[mask]              # (S, T, C)
        h_proj = self.act(self.proj(x_real.to(self.proj.weight.dtype)))  # (S, T, H)  eq. 4, first line
        _, h_last = self.gru(h_proj)                                   # (1, S, H)  eq. 4, second line
        e_real = h_last[0]                                             # (S, H)     e = h_gru^(T)
        if unpadded:
            return e_real.unflatten(0, (D, N))                         # (D, N, H)
        e = e_real.new_zeros(D, N, e_real.shape[-1])                   # (D, N, H)
        e[mask] = e_real
        return e                                                       # (D, N, H), 0 at padding


# ----------------------------------------------------------------------------------------------
# Factor encoder, eqs. 5-8 (training only: it reads the future returns y)
# ----------------------------------------------------------------------------------------------

class PortfolioLayer(nn.Module):
    """y_p = y . phi_p(e): M portfolios whose weights are a softmax over the day's stocks."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.w_p = nn.Linear(cfg.hidden_size, cfg.num_portfolios)

    def weights(self, e: Tensor, mask: Tensor) -> Tensor:
        logits = self.w_p(e).float()                                   # (D, N, M)
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
        return torch.softmax(logits, dim=1)                            # (D, N, M)  eq. 6, sum_i = 1

    def forward(self, e: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        a_p = self.weights(e, mask)                                    # (D, N, M)
        return (y.float()[..., None] * a_p).sum(dim=1)                 # (D, M)     eq. 7, in fp32


class LeastSquaresPortfolios(nn.Module):
    """FactorVAE-port: the CA portfolios y_p = (e^T e)^-1 e^T y, one per hidden unit (M = H).

    A small ridge, relative to the mean diagonal of e^T e, keeps the solve well posed; padded
    stocks have e = 0 and y = 0 and so add nothing to e^T e or e^T y. The (H, H) system is formed
    and solved in float64: it is tiny, and e^T e is often ill-conditioned (N < H, collinear
    hidden units), where float32 rounding would be amplified by the condition number."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.ridge = cfg.port_ridge

    def forward(self, e: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        with torch.autocast(device_type=e.device.type, enabled=False):
            e = torch.where(mask[..., None], e.double(), 0.0)          # (D, N, H)
            gram = e.transpose(1, 2) @ e                               # (D, H, H)  e^T e
            moment = torch.einsum("dnh,dn->dh", e, y.double())         # (D, H)     e^T y
            H = gram.shape[-1]
            scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)          # (D,)
            lam = self.ridge * scale + torch.finfo(gram.dtype).tiny    # (D,) > 0 even when e = 0
            eye = torch.eye(H, dtype=gram.dtype, device=gram.device)
            y_p = torch.linalg.solve(gram + lam[:, None, None] * eye, moment)  # (D, H)
        return y_p.float()


class FactorEncoder(nn.Module):
    """[mu_post, sigma_post] = phi_enc(y, e): portfolios, then the mapping layer phi_map."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        if cfg.variant == "port":
            self.portfolios: nn.Module = LeastSquaresPortfolios(cfg)
            num_portfolios = cfg.hidden_size
        else:
            self.portfolios = PortfolioLayer(cfg)
            num_portfolios = cfg.num_portfolios
        self.post_mu = nn.Linear(num_portfolios, cfg.num_factors)
        self.post_sigma = nn.Linear(num_portfolios, cfg.num_factors)
        self.sigma_floor = cfg.sigma_floor

    def forward(self, e: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        y_p = self.portfolios(e, y, mask)                              # (D, M)     eqs. 6-7
        y_p = y_p.to(self.post_mu.weight.dtype)
        mu_post = self.post_mu(y_p).float()                            # (D, K)     eq. 8
        sigma_post = positive_std(self.post_sigma(y_p), self.sigma_floor)  # (D, K)  eq. 8
        return mu_post, sigma_post


# ----------------------------------------------------------------------------------------------
# Factor decoder, eqs. 9-12
# ----------------------------------------------------------------------------------------------

class AlphaLayer(nn.Module):
    """[mu_alpha, sigma_alpha] = pi_alpha(e): the idiosyncratic return alpha ~ N(mu, sigma^2)."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.hidden = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = nn.LeakyReLU(cfg.leaky_slope)
        self.alpha_mu = nn.Linear(cfg.hidden_size, 1)
        self.alpha_sigma = nn.Linear(cfg.hidden_size, 1)
        self.sigma_floor = cfg.sigma_floor

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        h_alpha = self.act(self.hidden(e))                             # (D, N, H)  eq. 10
        mu_alpha = self.alpha_mu(h_alpha).squeeze(-1).float()          # (D, N)     eq. 10
        sigma_alpha = positive_std(self.alpha_sigma(h_alpha).squeeze(-1), self.sigma_floor)  # (D, N)
        return mu_alpha, sigma_alpha


class BetaLayer(nn.Module):
    """beta = phi_beta(e): factor exposures by a linear map."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.w_beta = nn.Linear(cfg.hidden_size, cfg.num_factors)

    def forward(self, e: Tensor) -> Tensor:
        return self.w_beta(e).float()                                  # (D, N, K)  eq. 11


class FactorDecoder(nn.Module):
    """y_hat = phi_dec(z, e) = alpha + beta z, as a Gaussian per stock."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.alpha = AlphaLayer(cfg)
        self.beta = BetaLayer(cfg)

    def forward(self, e: Tensor, mask: Tensor, mu_z: Tensor, sigma_z: Tensor | None) -> tuple[Tensor, Tensor]:
        """mu_z, sigma_z (D, K): the factors' distribution; sigma_z=None when z is a drawn sample
        (then z is known and only alpha is random). Returns mu_y, sigma_y (D, N), 0 at padding."""
        mu_alpha, sigma_alpha = self.alpha(e)                          # (D, N), (D, N)  eq. 10
        beta = self.beta(e)                                            # (D, N, K)       eq. 11
        # eq. 12 in float32 (elementwise + sum: autocast would run an einsum in bf16)
        mu_y = mu_alpha + (beta * mu_z.float()[:, None, :]).sum(dim=-1)  # (D, N)  eq. 12, mean
        var_y = sigma_alpha.square()                                   # (D, N)
        if sigma_z is not None:
            var_y = var_y + (beta.square() * sigma_z.float().square()[:, None, :]).sum(dim=-1)
        sigma_y = var_y.sqrt()                                         # (D, N)  eq. 12, std
        zero = torch.zeros_like(mu_y)
        return torch.where(mask, mu_y, zero), torch.where(mask, sigma_y, zero)


# ----------------------------------------------------------------------------------------------
# Factor predictor, eqs. 13-16 (sees only e, i.e. only history)
# ----------------------------------------------------------------------------------------------

class GlobalAttention(nn.Module):
    """K heads of global attention with one learnable query per head (eqs. 14-15).

    Weights are max(0, cos(q, k_i)) normalised by their sum over the day's real stocks: not a
    softmax, not a scaled dot product. When no real stock has a positive cosine the paper's
    ratio is 0/0; that head then averages the real stocks uniformly, the neutral "whole
    market" representation, which keeps outputs and gradients finite."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        K, H = cfg.num_factors, cfg.hidden_size
        self.num_heads = K
        bound = 1.0 / math.sqrt(H)                                     # nn.Linear's default init
        self.query = nn.Parameter(torch.randn(K, H))                   # (K, H)     q of each head
        self.w_key = nn.Parameter(torch.empty(K, H, H).uniform_(-bound, bound))    # (K, H_out, H_in)
        self.w_value = nn.Parameter(torch.empty(K, H, H).uniform_(-bound, bound))  # (K, H_out, H_in)

    def weights(self, e: Tensor, mask: Tensor) -> Tensor:
        """a_att (D, N, K): each head's weights over the day's stocks, 0 at padding."""
        with torch.autocast(device_type=e.device.type, enabled=False):  # weights in float32
            e = e.float()                                              # (D, N, H)
            w_key = self.w_key.float()                                 # (K, H, H)
            q = F.normalize(self.query.float(), dim=-1)                # (K, H)     q / ||q||
            # q . k_i = (w_key^T q) . e_i: a (D, N, H) x (H, K) product instead of the keys
            q_dot_k = e @ torch.einsum("kgh,kg->hk", w_key, q)         # (D, N, K)
            # all heads' keys as one (D*N, H) x (H, K*H) product, laid out (D, N, K, H) so that
            # the norm and its backward run over contiguous memory
            K, H = w_key.shape[0], w_key.shape[1]
            k = (e @ w_key.permute(2, 0, 1).reshape(H, K * H)).unflatten(-1, (K, H))  # (D, N, K, H)  eq. 14, k_i
            # ||k_i|| as sqrt(k_i . k_i), clamped before the root: a zero key (padding) then has a
            # finite gradient (k.norm() has none at 0)
            key_norm = torch.linalg.vecdot(k, k).clamp_min(ATTENTION_EPS**2).sqrt()  # (D, N, K)
            cos = q_dot_k / key_norm                                   # (D, N, K)  cos(q, k_i)
            score = torch.where(mask[..., None], cos.clamp_min(0.0), 0.0)  # (D, N, K)  max(0, cos)
            total = score.sum(dim=1, keepdim=True)                     # (D, 1, K)
            uniform = (mask / mask.sum(dim=1, keepdim=True).clamp_min(1))[..., None].float()  # (D, N, 1)
            return torch.where(total > ATTENTION_EPS,
                               score / total.clamp_min(ATTENTION_EPS), uniform)  # (D, N, K)  eq. 14

    def forward(self, e: Tensor, mask: Tensor) -> Tensor:
        a_att = self.weights(e, mask)                                  # (D, N, K)
        # v_i = w_value e_i is linear in e, so sum_i a_i v_i = w_value (sum_i a_i e_i): pool e
        # first and never form the (D, N, K, H) values.
        pooled = torch.einsum("dnk,dnh->dkh", a_att, e.float())        # (D, K, H)  sum_i a_i e_i
        h_multi = torch.einsum("dkh,kgh->dkg", pooled, self.w_value.float())  # (D, K, H)  eqs. 14-15
        return h_multi


class FactorPredictor(nn.Module):
    """[mu_prior, sigma_prior] = phi_pred(e): attention, then the distribution network pi_prior."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.attention = GlobalAttention(cfg)
        # pi_prior, "similar to eq. 10": shared across heads the way pi_alpha is shared across
        # stocks, so head k's own query is what makes factor k differ.
        self.hidden = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = nn.LeakyReLU(cfg.leaky_slope)
        self.prior_mu = nn.Linear(cfg.hidden_size, 1)
        self.prior_sigma = nn.Linear(cfg.hidden_size, 1)
        self.sigma_floor = cfg.sigma_floor

    def forward(self, e: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h_multi = self.attention(e, mask)                              # (D, K, H)  eqs. 14-15
        h_multi = h_multi.to(self.hidden.weight.dtype)
        h_prior = self.act(self.hidden(h_multi))                       # (D, K, H)  eq. 16
        mu_prior = self.prior_mu(h_prior).squeeze(-1).float()          # (D, K)     eq. 16
        sigma_prior = positive_std(self.prior_sigma(h_prior).squeeze(-1), self.sigma_floor)  # (D, K)
        return mu_prior, sigma_prior


# ----------------------------------------------------------------------------------------------
# Objective, eq. 17
# ----------------------------------------------------------------------------------------------

def gaussian_nll(y: Tensor, mu: Tensor, sigma: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """-(1/N) sum_i log N(y_i; mu_i, sigma_i^2) over each day's real stocks: (D, N) -> (D,).
    `weight` (beyond the paper, None in eq. 17): per-stock weights of that mean."""
    y, mu, sigma = y.float(), mu.float(), sigma.float()
    safe_sigma = torch.where(mask, sigma, torch.ones_like(sigma))     # padded slots hold sigma = 0
    nll = 0.5 * _LOG_2PI + safe_sigma.log() + 0.5 * ((y - mu) / safe_sigma).square()  # (D, N)
    return masked_mean_over_stocks(nll, mask, weight)                  # (D,)


def gaussian_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """KL(N(mu_q, diag sigma_q^2) || N(mu_p, diag sigma_p^2)) in closed form: (D, K) -> (D,)."""
    mu_q, sigma_q, mu_p, sigma_p = mu_q.float(), sigma_q.float(), mu_p.float(), sigma_p.float()
    kl = (sigma_p.log() - sigma_q.log()
          + (sigma_q.square() + (mu_q - mu_p).square()) / (2.0 * sigma_p.square()) - 0.5)  # (D, K)
    return kl.sum(dim=-1)                                              # (D,)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class FactorVAE(nn.Module):
    """Feature extractor + factor encoder + factor decoder + factor predictor (Figure 3)."""

    def __init__(self, cfg: FactorVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        # FactorVAE-prior has no posterior at all, so it has no encoder parameters.
        self.encoder = FactorEncoder(cfg) if cfg.variant != "prior" else None
        self.decoder = FactorDecoder(cfg)
        self.predictor = FactorPredictor(cfg)

    def forward(self, x: Tensor, mask: Tensor, y: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """Training loss of eq. 17, averaged over the D days (each day weighs the same).

        Returns scalars "loss", "nll", "kl" and, detached for logging, "mu_prior",
        "sigma_prior" and (not for "prior") "mu_post", "sigma_post", each (D, K). Factors are
        sampled in train mode and taken at their mean in eval mode.
        `weight` (D, N), beyond the paper: per-stock weights of the NLL's mean over a day
        (train.index_share); None is eq. 17. The encoder, portfolios and attention still see
        every stock alike."""
        self._check_batch(x, mask, y)
        y = torch.where(mask, y, torch.zeros_like(y)).float()         # (D, N) padding may hold NaN
        e = self.feature_extractor(x, mask)                            # (D, N, H)  eq. 4
        with self.head_precision(e) as e:
            return self._loss(e, mask, y, weight)

    def _loss(self, e: Tensor, mask: Tensor, y: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        """Eqs. 5-17 on the feature extractor's e."""
        mu_prior, sigma_prior = self.predictor(e, mask)                # (D, K)     eqs. 13-16
        out = {"mu_prior": mu_prior.detach(), "sigma_prior": sigma_prior.detach()}

        if self.encoder is None:
            # FactorVAE-prior: reconstruct y from the prior factors directly, no KL term.
            z_prior = reparameterise(mu_prior, sigma_prior, self.training)  # (D, K)
            mu_rec, sigma_rec = self.decoder(e, mask, z_prior, None)   # (D, N)
            nll = gaussian_nll(y, mu_rec, sigma_rec, mask, weight)     # (D,)
            kl = torch.zeros_like(nll)
        else:
            mu_post, sigma_post = self.encoder(e, y, mask)             # (D, K)     eqs. 5-8
            z_post = reparameterise(mu_post, sigma_post, self.training)  # (D, K)   eq. 5
            mu_rec, sigma_rec = self.decoder(e, mask, z_post, None)    # (D, N)     y_rec = alpha + beta z_post
            nll = gaussian_nll(y, mu_rec, sigma_rec, mask, weight)     # (D,)       eq. 17, first term
            kl = gaussian_kl(mu_post, sigma_post, mu_prior, sigma_prior)  # (D,)    eq. 17, second term
            out["mu_post"], out["sigma_post"] = mu_post.detach(), sigma_post.detach()

        loss = (nll + self.cfg.gamma * kl).mean()                      # ()         eq. 17
        out.update(loss=loss, nll=nll.mean(), kl=kl.mean())
        return out

    def predict(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """mu_pred, sigma_pred (D, N), 0 at padding: predictor + decoder only, never the encoder.
        Wrap in torch.inference_mode() when no gradient is wanted."""
        self._check_batch(x, mask)
        e = self.feature_extractor(x, mask)                            # (D, N, H)  eq. 19
        with self.head_precision(e) as e:
            mu_prior, sigma_prior = self.predictor(e, mask)            # (D, K)     eq. 19
            return self.decoder(e, mask, mu_prior, sigma_prior)        # (D, N)     eqs. 18, 12

    def factor_exposures(self, x: Tensor, mask: Tensor) -> Tensor:
        """beta (D, N, K), 0 at padding."""
        self._check_batch(x, mask)
        e = self.feature_extractor(x, mask)                            # (D, N, H)
        with self.head_precision(e) as e:
            beta = self.decoder.beta(e)                                # (D, N, K)  eq. 11
        return torch.where(mask[..., None], beta, torch.zeros_like(beta))

    @contextlib.contextmanager
    def head_precision(self, e: Tensor):
        """Autocast off for eqs. 5-19 (see "Mixed precision" above); yields e in the dtype of
        the head's parameters (float32, or bf16 when DeepSpeed keeps the weights in bf16)."""
        with torch.autocast(device_type=e.device.type, enabled=False):
            yield e.to(self.decoder.beta.w_beta.weight.dtype)

    def _check_batch(self, x: Tensor, mask: Tensor, y: Tensor | None = None) -> None:
        check_batch("FactorVAE", self.cfg.num_features, x, mask, y)


def check_batch(model_name: str, num_features: int, x: Tensor, mask: Tensor, y: Tensor | None = None) -> None:
    """DataError naming the input that does not have the batch layout x (D, N, T, C), mask and
    y (D, N), or a day without a real stock (shared with the baselines)."""
    C = num_features
    if x.dim() != 4 or x.shape[-1] != C:
        raise DataError(f"{model_name} input x: expected shape (D, N, T, C={C}), got {tuple(x.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise DataError(f"{model_name} input mask: expected bool (D, N)={tuple(x.shape[:2])}, "
                        f"got {mask.dtype} {tuple(mask.shape)}")
    if y is not None and tuple(y.shape) != tuple(x.shape[:2]):
        raise DataError(f"{model_name} input y: expected shape (D, N)={tuple(x.shape[:2])}, got {tuple(y.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise DataError(f"{model_name} input mask: every day needs at least one real stock, found a day with none")


def build_model(cfg: FactorVAEConfig) -> FactorVAE:
    """The model for a config (one place to hook initialisation or variants later)."""
    return FactorVAE(cfg)
