"""Trans (Ding et al. 2020; Qlib's Transformer benchmark): each stock's window through a
Transformer encoder (Vaswani et al. 2017), head on the last step.

    h_t = W_in x_t + b_in + PE(t)                 PE: sinusoidal positions, PE(t, 2i) = sin(t / 10000^(2i/H)),
                                                  PE(t, 2i+1) = cos(t / 10000^(2i/H))
    h   = TransformerEncoder(h)                   num_layers layers, num_heads heads, dropout
    y_hat = w^T h_T + b
The feed-forward width is 4 H (Vaswani et al.'s ratio); Qlib keeps torch's default 2048, 32x
wider at H = 64, which would dominate the cost on CPU for no documented gain."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fvae_dist.models.baselines.common import PerStockModel


def sinusoidal_positions(T: int, H: int, device, dtype) -> Tensor:
    """(T, H) sinusoidal position encodings (Vaswani et al. 2017, section 3.5)."""
    position = torch.arange(T, device=device, dtype=torch.float32)[:, None]      # (T, 1)
    rate = torch.exp(torch.arange(0, H, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / H))
    pe = torch.zeros(T, H, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * rate)
    pe[:, 1::2] = torch.cos(position * rate[: H // 2])
    return pe.to(dtype)


class TransformerBaseline(PerStockModel):
    label = "Trans"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        H = cfg.hidden_size
        self.input_map = nn.Linear(cfg.num_features, H)
        layer = nn.TransformerEncoderLayer(d_model=H, nhead=cfg.num_heads, dim_feedforward=4 * H,
                                           dropout=cfg.dropout, batch_first=True)
        # no padding mask is ever passed (every window is complete), so the nested-tensor path
        # would only warn
        self.encoder = nn.TransformerEncoder(layer, num_layers=cfg.num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(H, 1)

    def score_real(self, x_real: Tensor) -> Tensor:
        h = self.input_map(x_real)                                     # (S, T, H)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        h = self.encoder(h)                                            # (S, T, H)
        return self.out(h[:, -1]).squeeze(-1)                          # (S,)
