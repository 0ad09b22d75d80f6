"""SFM, the State Frequency Memory recurrent network (Zhang, Aggarwal and Qi, KDD 2017).

Its memory is a matrix S_t in C^(H x K): H state dimensions times K frequency components,
omega_k = 2 pi k / K. At step t = 1..T, from the input x_t and the previous output h_{t-1}:
    i_t     = sigmoid(W_i x_t + U_i h_{t-1} + b_i)            (H)  input gate
    f_ste_t = sigmoid(W_ste x_t + U_ste h_{t-1} + b_ste)      (H)  state forget gate
    f_fre_t = sigmoid(W_fre x_t + U_fre h_{t-1} + b_fre)      (K)  frequency forget gate
    F_t     = f_ste_t (outer) f_fre_t                         (H, K) joint forget gate
    g_t     = i_t * tanh(W_c x_t + U_c h_{t-1} + b_c)         (H)  new input
    Re S_t  = F_t * Re S_{t-1} + g_t (outer) cos(omega t)     (H, K)
    Im S_t  = F_t * Im S_{t-1} + g_t (outer) sin(omega t)     (H, K)
    A_t     = (Re S_t)^2 + (Im S_t)^2                         (H, K) amplitude of each frequency
    c_t     = tanh(A_t u_a + b_a)                             (H)  amplitudes combined over frequencies
    o_t     = sigmoid(W_o x_t + U_o h_{t-1} + b_o)            (H)  output gate
    h_t     = o_t * c_t                                       (H)
and the forecast is a linear head on h_T. Dropout (model.dropout) is variational, one mask per
sequence on the input and one on h_{t-1} where they enter the gates (Qlib's dropout_W,
dropout_U). The recurrence runs in float32 (its state is a sum of squares)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvae_dist.models.baselines.common import PerStockModel


def sfm_recurrence(x_gates: Tensor, w_rec: Tensor, h_mask: Tensor | None, u_a: Tensor, b_a: Tensor) -> Tensor:
    """The module docstring's steps t = 1..T from every step's input-gate terms x_gates (S, T, 4H+K)
    = W x_t + b; w_rec (4H+K, H) holds the U maps, u_a (K,) and b_a (H,) the amplitude map. h_mask
    (S, H) is the recurrent dropout mask or None. Returns h_T (S, H)."""
    S, T, _ = x_gates.shape
    H, K = b_a.shape[0], u_a.shape[0]
    h = x_gates.new_zeros(S, H)
    re = x_gates.new_zeros(S, H, K)
    im = x_gates.new_zeros(S, H, K)
    omega = 2.0 * math.pi * torch.arange(K, device=x_gates.device, dtype=torch.float32) / K  # (K,)
    for t in range(T):
        h_in = h if h_mask is None else h * h_mask
        gates = x_gates[:, t] + h_in @ w_rec.T                         # (S, 4H+K)
        i, f_ste, c_in, o = gates[:, : 4 * H].split(H, dim=-1)
        f_fre = torch.sigmoid(gates[:, 4 * H:])                        # (S, K)
        forget = torch.sigmoid(f_ste)[:, :, None] * f_fre[:, None, :]  # (S, H, K)
        g = torch.sigmoid(i) * torch.tanh(c_in)                        # (S, H)
        phase = omega * (t + 1)                                        # (K,)  t = 1..T
        re = forget * re + g[:, :, None] * torch.cos(phase)
        im = forget * im + g[:, :, None] * torch.sin(phase)
        amplitude = re.square() + im.square()                          # (S, H, K)
        c = torch.tanh(amplitude @ u_a + b_a)                          # (S, H)
        h = torch.sigmoid(o) * c                                       # (S, H)
    return h


class SFMBaseline(PerStockModel):
    label = "SFM"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        H, K = cfg.hidden_size, cfg.freq_dim
        self.hidden_size, self.freq_dim = H, K
        self.dropout = cfg.dropout
        # the five gates' input and recurrent maps, fused: i, ste, c, o (H each) and fre (K)
        self.input_gates = nn.Linear(cfg.num_features, 4 * H + K)
        self.recurrent_gates = nn.Linear(H, 4 * H + K, bias=False)
        self.amplitude = nn.Linear(K, 1, bias=False)                   # u_a
        self.amplitude_bias = nn.Parameter(torch.zeros(H))             # b_a
        self.out = nn.Linear(H, 1)
        nn.init.orthogonal_(self.recurrent_gates.weight)

    # the time loop, a plain function of tensors: accel's "compile" path (train.cpu_kernels) swaps
    # in torch.compile(sfm_recurrence) per model; the parameters and the function stay the same
    recurrence = staticmethod(sfm_recurrence)

    def score_real(self, x_real: Tensor) -> Tensor:
        S = x_real.shape[0]
        with torch.autocast(device_type=x_real.device.type, enabled=False):
            x = x_real.float()
            if self.training and self.dropout > 0:
                x = x * _variational_mask(x[:, :1, :], self.dropout)    # same mask at every step
                h_mask = _variational_mask(x.new_empty(S, self.hidden_size), self.dropout)
            else:
                h_mask = None
            x_gates = x @ self.input_gates.weight.float().T + self.input_gates.bias.float()  # (S, T, 4H+K) all steps
            h = self.recurrence(x_gates, self.recurrent_gates.weight.float(), h_mask,
                                self.amplitude.weight.float()[0], self.amplitude_bias.float())
            return F.linear(h, self.out.weight.float(), self.out.bias.float()).squeeze(-1)  # (S,)


def _variational_mask(like: Tensor, p: float) -> Tensor:
    """Inverted-dropout mask of like's shape, to be reused at every time step."""
    return torch.bernoulli(torch.full_like(like, 1.0 - p)) / (1.0 - p)
