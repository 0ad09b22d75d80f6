"""A single-layer GRU for CPU training whose backward pass is written out by hand.

    gru_last_hidden(x, weight_ih, weight_hh, bias_ih, bias_hh) -> h_T      (S, T, I) -> (S, H)

Same equations, parameter layout and results (to float32 rounding) as torch.nn.GRU, gates
ordered r, z, n as there:
    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1},   h_0 = 0

Why it exists: FactorVAE's training step is bound by its GRU (eq. 4). At its sizes (S ~ 300
stocks, H = 64) an elementwise op costs about as much in call overhead as in arithmetic, and
torch's CPU GRU records every time step's ops for autograd and computes the weight gradients
with one small matmul per step. Here:
  * only the two matmuls that truly recur stay inside the time loop (h_{t-1} W_hh^T going
    forward, dgates W_hh going backward); the input projection of all T steps and every weight
    gradient are each one matmul over T*S rows, which run at the machine's matmul speed;
  * a backward step is 10 elementwise ops on cache-resident (S, H) slices and one addmm;
  * the gradient buffer is laid out [d a_n | d a_r | d a_z | r * d a_n], so the input-side
    gradient (gates n, r, z) and the recurrent one (r, z, n) are both views of it;
  * tanh(a) is computed as 2 sigmoid(2a) - 1 with the factor 2 folded into the n-gate weights:
    torch's CPU tanh is about 8x slower than its sigmoid at this size.
scripts/bench_train.py (its "gru" entries) times it against torch.nn.GRU.

Under CPU autocast (bf16) the matmuls run in the autocast dtype; the recurrent state and all
elementwise work stay in float32.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gru_last_hidden(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> Tensor:
    """h_T (S, H) of a one-layer GRU with zero initial state over batch-first x (S, T, I)."""
    if x.dim() != 3:
        raise ValueError(f"gru_last_hidden: expected x of shape (S, T, I), got {tuple(x.shape)}")
    params = (x, weight_ih, weight_hh, bias_ih, bias_hh)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _FusedGRU.apply(*params)
    h_last, _ = _forward(*params, keep_for_backward=False)
    return h_last


class _FusedGRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_ih, weight_hh, bias_ih, bias_hh):
        h_last, saved = _forward(x, weight_ih, weight_hh, bias_ih, bias_hh, keep_for_backward=True)
        ctx.save_for_backward(*saved)
        ctx.input_dtypes = (x.dtype, weight_ih.dtype, weight_hh.dtype, bias_ih.dtype, bias_hh.dtype)
        return h_last

    @staticmethod
    def backward(ctx, grad_h_last):
        grads = _backward(grad_h_last, *ctx.saved_tensors, need_grad_x=ctx.needs_input_grad[0])
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes))


def _forward(x, weight_ih, weight_hh, bias_ih, bias_hh, *, keep_for_backward: bool):
    S, T, _ = x.shape
    H = weight_hh.shape[1]
    device_type = x.device.type
    # float32 state (float64 when the input is double, which gradcheck needs)
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    mm_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else state_dtype
    f32 = dict(dtype=state_dtype, device=x.device)
    with torch.autocast(device_type, enabled=False):
        # Input side in gate order (n, r, z); the n rows doubled for tanh(a) = 2 sigmoid(2a) - 1.
        # b_hr and b_hz sit outside r * (...), so they fold into the input-side bias; b_hn is
        # multiplied by r and stays with the recurrent term.
        zeros = torch.zeros(H, **f32)
        w_ih = _n_r_z(weight_ih.to(state_dtype), H)                                # (3H, I)
        b_h = bias_hh.to(state_dtype)
        bias_x = _n_r_z(bias_ih.to(state_dtype), H) + torch.cat([zeros, b_h[: 2 * H]])
        n_doubled = torch.cat([torch.full((H,), 2.0, **f32), torch.ones(2 * H, **f32)])
        x_tm = x.transpose(0, 1).to(mm_dtype).contiguous()                          # (T, S, I)
        gx = _matmul(x_tm.view(T * S, -1), (w_ih * n_doubled[:, None]).t(), mm_dtype, state_dtype,
                     bias_x * n_doubled).view(T, S, 3 * H)                          # [2a_n^x | a_r^x | a_z^x]
        w_hh_t = weight_hh.to(state_dtype).t().to(mm_dtype)                                  # (H, 3H)
        bias_h = torch.cat([zeros, zeros, b_h[2 * H:]])

        hs = torch.empty((T + 1, S, H), **f32)                                      # h_0 .. h_T
        hs[0].zero_()
        gh = torch.empty((T, S, 3 * H), **f32)                                      # [a_r^h | a_z^h | W_hn h + b_hn]
        rz = torch.empty((T, S, 2 * H), **f32)                                      # r_t, z_t
        n = torch.empty((T, S, H), **f32)                                           # n_t
        h_minus_n = torch.empty((T, S, H), **f32)                                   # h_{t-1} - n_t
        for t in range(T):
            h_prev = hs[t]
            _matmul(h_prev, w_hh_t, mm_dtype, state_dtype, bias_h, out=gh[t])
            torch.add(gx[t, :, H:], gh[t, :, : 2 * H], out=rz[t]).sigmoid_()
            # n = 2 sigmoid(2 a_n) - 1 = tanh(a_n), where 2 a_n = 2 a_n^x + 2 r (W_hn h + b_hn)
            torch.addcmul(gx[t, :, :H], rz[t, :, :H], gh[t, :, 2 * H:], value=2, out=n[t]).sigmoid_().mul_(2).sub_(1)
            torch.sub(h_prev, n[t], out=h_minus_n[t])
            torch.addcmul(n[t], rz[t, :, H:], h_minus_n[t], out=hs[t + 1])          # h_t = n + z (h - n)
        h_last = hs[T].to(x.dtype, copy=True)
        if not keep_for_backward:
            return h_last, ()
        saved = (x_tm, w_ih.to(mm_dtype), weight_hh.to(state_dtype).to(mm_dtype), hs, rz, gh, n, h_minus_n)
    return h_last, saved


def _backward(grad_h_last, x_tm, w_ih, w_hh, hs, rz, gh, n, h_minus_n, *, need_grad_x):
    """Gradients for (x, weight_ih, weight_hh, bias_ih, bias_hh) in torch's gate order (r, z, n)."""
    T, S, H = n.shape
    mm_dtype, state_dtype = w_hh.dtype, hs.dtype
    with torch.autocast(hs.device.type, enabled=False):
        # [d a_n | d a_r | d a_z | r d a_n]: columns 0:3H are the input-side pre-activation
        # gradient (gates n, r, z), columns H:4H the recurrent one (gates r, z, n).
        grads = torch.empty((T, S, 4 * H), dtype=hs.dtype, device=hs.device)
        dh = grad_h_last.to(hs.dtype)
        for t in range(T - 1, -1, -1):
            r, z, n_t = rz[t, :, :H], rz[t, :, H:], n[t]
            d_n = torch.addcmul(dh, dh, z, value=-1)                                # dh (1 - z)
            d_an = torch.addcmul(d_n, d_n * n_t, n_t, value=-1, out=grads[t, :, :H])  # tanh' = 1 - n^2
            torch.mul(d_an, gh[t, :, 2 * H:], out=grads[t, :, H: 2 * H])            # d r
            torch.mul(dh, h_minus_n[t], out=grads[t, :, 2 * H: 3 * H])             # d z
            grads[t, :, H: 3 * H].mul_(torch.addcmul(rz[t], rz[t], rz[t], value=-1))  # sigmoid' = s (1 - s)
            torch.mul(d_an, r, out=grads[t, :, 3 * H:])                            # d (W_hn h + b_hn)
            dh = _matmul(grads[t, :, H:], w_hh, mm_dtype, state_dtype, dh * z)                  # into h_{t-1}

        # One matmul or one reduction over all T*S rows each.
        flat = grads.view(T * S, 4 * H)
        g_input, g_recurrent = flat[:, : 3 * H], flat[:, H:]
        grad_w_hh = _matmul(g_recurrent.t(), hs[:T].reshape(T * S, H), mm_dtype, state_dtype)
        grad_w_ih = _r_z_n(_matmul(g_input.t(), x_tm.view(T * S, -1), mm_dtype, state_dtype), H)
        grad_b_ih = _r_z_n(g_input.sum(0), H)
        grad_b_hh = g_recurrent.sum(0)
        grad_x = _matmul(g_input, w_ih, mm_dtype, state_dtype).view(T, S, -1).transpose(0, 1) if need_grad_x else None
    return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def _matmul(a: Tensor, b: Tensor, mm_dtype: torch.dtype, state_dtype: torch.dtype,
            bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """bias + a @ b as state_dtype, the product computed in mm_dtype (the same, or bf16 under
    autocast)."""
    if mm_dtype == state_dtype:
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    product = torch.mm(a.to(mm_dtype), b.to(mm_dtype)).to(state_dtype)
    if bias is not None:
        product += bias
    return product if out is None else out.copy_(product)


def _n_r_z(rows: Tensor, H: int) -> Tensor:
    """torch's gate blocks (r, z, n) -> (n, r, z)."""
    return torch.cat([rows[2 * H:], rows[: 2 * H]])


def _r_z_n(rows: Tensor, H: int) -> Tensor:
    """(n, r, z) -> torch's (r, z, n)."""
    return torch.cat([rows[H:], rows[:H]])
