"""FactorVAE's training loss (eqs. 5-17) with its gradient in one native pass (CPU).

The same function as FactorVAE._loss on the reference modules of models/factorvae.py, with the
same parameters, the same random draw of z_post and the same outputs; only the arithmetic is
arranged differently:

    P = e A + b       one (D*N, H) x (H, M + H + 2K + K*H) product: every quantity linear in
                      e_i (portfolio logits, alpha's hidden layer, beta, each head's q.k and key)
    kernel(P, e, y)   native/factor_head.cpp: the rest of eqs. 5-17 for each day, and the loss's
                      gradient with respect to P, to e (through the attention's pooling) and to
                      the small parameters, derived by hand
    de = dP A^T + de_pool,  dA = e^T dP      two more products

Where torch exports its BLAS's sgemm (native/build.py: torch_sgemm), all of it, A's assembly and
the three products included, is one native call (fvae_head_step_f32) that writes every gradient
in its parameter's layout; otherwise torch does the products and the rest of the bookkeeping
(about 40 small ops, 0.3 ms a step whatever the batch size).

Why: the reference runs about 400 small tensor ops per step, forward and backward, and at
FactorVAE's size their bookkeeping costs more than their arithmetic (about 2 ms of a 13 ms
training step on one CPU core). The gradient is computed together with the loss, in forward;
backward only scales it by the incoming gradient. So "nll", "kl" and the factor moments come
back detached: only "loss" can be differentiated, which is all training needs.

Taken for the "factorvae" variant on CPU in float32 when gradients are being recorded and the
kernel is available (native/build.py; FVAE_DIST_FUSED_HEAD=0 turns it off). Evaluation,
prediction, the other variants and anything else run the reference modules.
tests/models/test_fused_head.py checks the loss, the outputs and every gradient against them.
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from fvae_dist.native.build import load_head_kernels, torch_sgemm

# Whether the three products run inside the native call, through torch's own sgemm (True, where
# torch exports one) or through torch (False: forced by the tests, which check both).
native_products = True
NUM_KERNEL_PARAMS = 15   # the parameters the kernel reads itself (factor_head.cpp's enum Param)


def fused_loss_applies(model, e: Tensor) -> bool:
    """Whether FactorVAE's loss can take the fused path for this batch's e (D, N, H)."""
    return (model.cfg.variant == "factorvae" and e.device.type == "cpu" and e.dtype == torch.float32
            and torch.is_grad_enabled()
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in _head_params(model))
            and load_head_kernels() is not None)


def fused_loss(model, e: Tensor, mask: Tensor, y: Tensor, attention_eps: float) -> dict[str, Tensor]:
    """FactorVAE._loss(e, mask, y) through the native kernel (see the module docstring);
    attention_eps: the attention's 0/0 guard (models/factorvae.py's ATTENTION_EPS)."""
    sigma_shape = (e.shape[0], model.cfg.num_factors)
    # the draw the reference makes for z_post = mu + sigma * eps (eq. 5): same generator, shape, order
    eps = torch.randn(sigma_shape, dtype=torch.float32) if model.training else torch.zeros(sigma_shape)
    sgemm = torch_sgemm() if native_products else None
    loss, per_day, means = _FusedLoss.apply(e, y, mask, eps, model.cfg, attention_eps, load_head_kernels(), sgemm,
                                            *_head_params(model))
    K = model.cfg.num_factors
    mu_post, sigma_post, mu_prior, sigma_prior = per_day[:, 2:].split(K, dim=1)
    return {"mu_prior": mu_prior, "sigma_prior": sigma_prior, "mu_post": mu_post, "sigma_post": sigma_post,
            "loss": loss, "nll": means[0], "kl": means[1]}


# model -> its head parameters in _FusedLoss's order. Looked up once: the attribute chains cost
# 40 us a step. Parameters keep their identity through .to(), load_state_dict and DDP.
_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_params(model) -> list[Tensor]:
    """The parameters folded into the product P = e A + b, in A's column order, then the ones the
    kernel reads itself, in the order of factor_head.cpp's enum Param."""
    params = _PARAMS.get(model)
    if params is None:
        enc, alpha, beta, pred = model.encoder, model.decoder.alpha, model.decoder.beta, model.predictor
        params = [enc.portfolios.w_p.weight, enc.portfolios.w_p.bias, alpha.hidden.weight, alpha.hidden.bias,
                  beta.w_beta.weight, beta.w_beta.bias, pred.attention.query, pred.attention.w_key,
                  # the kernel's own
                  enc.post_mu.weight, enc.post_mu.bias, enc.post_sigma.weight, enc.post_sigma.bias,
                  alpha.alpha_mu.weight, alpha.alpha_mu.bias, alpha.alpha_sigma.weight, alpha.alpha_sigma.bias,
                  pred.attention.w_value,
                  pred.hidden.weight, pred.hidden.bias, pred.prior_mu.weight, pred.prior_mu.bias,
                  pred.prior_sigma.weight, pred.prior_sigma.bias]
        _PARAMS[model] = params
    return params


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class _FusedLoss(torch.autograd.Function):
    """(loss (), per_day (D, 2 + 4K): nll, kl, mu_post, sigma_post, mu_prior, sigma_prior,
    means (2,): nll and kl averaged over days). sgemm: the address of torch's BLAS sgemm, for the
    whole step in one native call; None: the three products through torch."""

    @staticmethod
    def forward(ctx, e, y, mask, eps, cfg, attention_eps, kernels, sgemm, *params):
        step = _native_products if sgemm is not None else _torch_products
        loss, per_day, means, ctx.grads = step(e, y, mask, eps, cfg, attention_eps, kernels, sgemm, params)
        ctx.mark_non_differentiable(per_day, means)
        return loss, per_day, means

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_day, _grad_means):
        grads, ctx.grads = ctx.grads, None
        if float(grad_loss) != 1.0:                                    # e.g. a scaled loss
            grads = [g * grad_loss for g in grads]
        de, *params = grads
        return (de, None, None, None, None, None, None, None, *params)


def _native_products(e, y, mask, eps, cfg, attention_eps, kernels, sgemm, params):
    """The whole step in one native call (factor_head.cpp, fvae_head_step_f32): A (built there as
    its transpose, whose row blocks are the parameters' own layouts), the three products through
    torch's own sgemm, the kernel, and every gradient in its parameter's layout.
    Saves the 40-odd small torch ops of _torch_products: forward + backward at 259 stocks
    0.97 ms against 1.26 ms (one core), at 2 stocks 0.23 against 0.51 ms."""
    D, N, H = e.shape
    M, K = params[0].shape[0], params[4].shape[0]                      # w_p (M, H), w_beta (K, H)
    params = [p.contiguous() for p in params]
    e_rows, y, mask = e.reshape(D * N, H).contiguous(), y.contiguous(), mask.contiguous()
    grads = [torch.empty_like(p) for p in params]
    de = e.new_empty(D, N, H)
    per_day, loss, means = e.new_empty(D, 2 + 4 * K), e.new_empty(()), e.new_empty(2)
    work = e.new_empty(kernels.fvae_head_work_size(D, N, H, M, K))
    linear = len(params) - NUM_KERNEL_PARAMS
    kernels.fvae_head_step_f32(
        sgemm, D, N, H, M, K, e_rows.data_ptr(), y.data_ptr(), mask.data_ptr(), eps.data_ptr(),
        _pointers(params[:linear]), _pointers(params[linear:]), _pointers(grads[:linear]),
        _pointers(grads[linear:]), cfg.leaky_slope, cfg.sigma_floor, cfg.gamma, attention_eps,
        per_day.data_ptr(), loss.data_ptr(), means.data_ptr(), de.data_ptr(), work.data_ptr())
    return loss, per_day, means, [de, *grads]


def _torch_products(e, y, mask, eps, cfg, attention_eps, kernels, _sgemm, params):
    """The products through torch, the kernel (fvae_head_loss_and_grad) for the rest."""
    w_p, b_p, w_hid, b_hid, w_beta, b_beta, query, w_key, *small = params
    D, N, H = e.shape
    K, M = w_beta.shape[0], w_p.shape[0]
    # A's columns: [logits_p (M) | pre_alpha (H) | beta (K) | q.k (K) | keys (K*H)]
    q_unit = F.normalize(query, dim=-1)                            # (K, H)       q / |q|
    q_through_key = torch.bmm(q_unit[:, None, :], w_key)[:, 0].t()  # (H, K)      q . k_i = this . e_i
    keys = w_key.permute(2, 0, 1).reshape(H, K * H)                # (H, K*H)     k_i = w_key e_i
    A = torch.cat([w_p.t(), w_hid.t(), w_beta.t(), q_through_key, keys], dim=1)   # (H, W)
    biased = M + H + K                                             # columns with a bias
    bias = torch.cat([b_p, b_hid, b_beta, e.new_zeros(A.shape[1] - biased)])
    e_rows = e.reshape(D * N, H).contiguous()
    P = torch.addmm(bias, e_rows, A)                               # (D*N, W)

    small = [p.contiguous() for p in small]
    small_grads = [torch.zeros_like(p) for p in small]
    per_day = e.new_empty(D, 2 + 4 * K)
    dP, de_pool = torch.empty_like(P), e.new_empty(D * N, H)
    y = y.contiguous()
    mask = mask.contiguous()
    kernels.fvae_head_loss_and_grad(
        D, N, H, M, K, P.data_ptr(), e_rows.data_ptr(), y.data_ptr(), mask.data_ptr(), eps.data_ptr(),
        _pointers(small), _pointers(small_grads), cfg.leaky_slope, cfg.sigma_floor, cfg.gamma, attention_eps,
        per_day.data_ptr(), dP.data_ptr(), de_pool.data_ptr())
    loss = (per_day[:, 0] + cfg.gamma * per_day[:, 1]).mean()

    # the gradients of e and of A's blocks, then of the parameters behind each block
    de = torch.addmm(de_pool, dP, A.t()).view(D, N, H)
    dA = e_rows.t() @ dP                                           # (H, W)
    db = dP[:, :biased].sum(dim=0)
    d_w_p, d_w_hid, d_w_beta, d_qk, d_keys = dA.split([M, H, K, K, K * H], dim=1)
    d_b_p, d_b_hid, d_b_beta = db.split([M, H, K])
    d_qk = d_qk.t()                                                # (K, H)
    d_w_key = d_keys.reshape(H, K, H).permute(1, 2, 0) + q_unit[:, :, None] * d_qk[:, None, :]
    d_q_unit = torch.bmm(w_key, d_qk[:, :, None])[:, :, 0]          # (K, H)
    d_query = _normalize_backward(query, q_unit, d_q_unit)
    grads = [de, d_w_p.t(), d_b_p, d_w_hid.t(), d_b_hid, d_w_beta.t(), d_b_beta, d_query, d_w_key, *small_grads]
    return loss, per_day, per_day[:, :2].mean(dim=0), grads


def _normalize_backward(x: Tensor, unit: Tensor, d_unit: Tensor) -> Tensor:
    """Gradient of F.normalize(x, dim=-1) = x / max(|x|, 1e-12), row by row."""
    norm = x.norm(dim=-1, keepdim=True)
    projected = d_unit - unit * (unit * d_unit).sum(dim=-1, keepdim=True)
    return torch.where(norm > 1e-12, projected / norm.clamp_min(1e-12), d_unit / 1e-12)
