"""GAT (Velickovic et al. 2018; Qlib's GATs benchmark): a GRU encodes each stock's window, then
one graph-attention layer over the day's stocks, a fully connected graph learnt from the data
("predicts without knowing the graph structure upfront").

    e_i     = GRU(x_i)_T                                        (H) per stock, real stocks only
    s_ij    = LeakyReLU_0.2( a^T [W e_i || W e_j] )             attention logits
    alpha_ij = softmax over the day's real stocks j of s_ij     (self included; padding never a j)
    m_i     = sum_j alpha_ij W e_j                               attended neighbourhood
    y_hat_i = w_2^T LeakyReLU(W_1 (e_i + m_i) + b_1) + b_2       head on e + attended (Qlib: the
                                                                 same residual, fc, LeakyReLU, fc_out)
The attention runs in float32; a^T [u || v] = a_1^T u + a_2^T v, so the (N, N) logits are a sum
of a column and a row and no (N, N, 2H) tensor is formed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvae_dist.models.baselines.common import PointForecastBaseline, input_dtype, scatter_to_days
from fvae_dist.models.baselines.gru import GRUEncoder

ATTENTION_SLOPE = 0.2  # Velickovic et al.'s LeakyReLU slope for the attention logits


class GATBaseline(PointForecastBaseline):
    label = "GAT"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        H = cfg.hidden_size
        self.encoder = GRUEncoder(cfg)
        self.transform = nn.Linear(H, H, bias=False)                   # W
        self.attention = nn.Linear(2 * H, 1, bias=False)               # a = [a_1; a_2]
        self.hidden = nn.Linear(H, H)
        self.act = nn.LeakyReLU()
        self.out = nn.Linear(H, 1)

    def attention_weights(self, e: Tensor, mask: Tensor) -> Tensor:
        """alpha (D, N, N): row i is stock i's weights over the day's real stocks j; rows of
        padded slots are finite too (their outputs are masked later)."""
        with torch.autocast(device_type=e.device.type, enabled=False):
            w_e = e.float() @ self.transform.weight.float().T          # (D, N, H)
            a = self.attention.weight.float()[0]                       # (2H,)
            H = w_e.shape[-1]
            logits = (w_e @ a[:H])[:, :, None] + (w_e @ a[H:])[:, None, :]  # (D, N, N)
            logits = F.leaky_relu(logits, ATTENTION_SLOPE)
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            return torch.softmax(logits, dim=-1)                       # every day has a real stock

    def scores(self, x: Tensor, mask: Tensor) -> Tensor:
        e_real = self.encoder(x[mask].to(input_dtype(self)))           # (S, H)
        e = scatter_to_days(e_real.float(), mask)                      # (D, N, H), 0 at padding
        alpha = self.attention_weights(e, mask)                        # (D, N, N)
        attended = alpha @ (e @ self.transform.weight.float().T)       # (D, N, H)  sum_j alpha_ij W e_j
        h = (e + attended)[mask]                                       # (S, H) real stocks only
        h = self.act(self.hidden(h.to(input_dtype(self))))
        return scatter_to_days(self.out(h).squeeze(-1).float(), mask)  # (D, N), 0 at padding
