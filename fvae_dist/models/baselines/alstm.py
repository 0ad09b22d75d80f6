"""ALSTM (Qin et al. 2017; Feng et al. 2019's attentive LSTM, as in Qlib's benchmark): an LSTM
whose hidden states are also pooled by temporal attention.

    h_in_t  = tanh(W_in x_t + b_in)                       input mapping
    h_t     = LSTM(h_in_t, h_{t-1})                       num_layers stacked
    a_t     = softmax_t( u^T tanh(W_a h_t + b_a) )        temporal attention over the T steps
    y_hat   = w^T [h_T ; sum_t a_t h_t] + b               head on last state and attention summary
Qlib's Alpha158 config runs the same network with rnn_type GRU; the paper's name is the LSTM one."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fvae_dist.models.baselines.common import PerStockModel


class ALSTMBaseline(PerStockModel):
    label = "ALSTM"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        H = cfg.hidden_size
        self.input_map = nn.Linear(cfg.num_features, H)
        dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.lstm = nn.LSTM(H, H, num_layers=cfg.num_layers, dropout=dropout, batch_first=True)
        # the attention network is half as wide as the state (as in Qlib's ALSTM)
        self.att_hidden = nn.Linear(H, max(H // 2, 1))
        self.att_score = nn.Linear(max(H // 2, 1), 1, bias=False)      # a bias would cancel in the softmax
        self.out = nn.Linear(2 * H, 1)

    def score_real(self, x_real: Tensor) -> Tensor:
        h_in = torch.tanh(self.input_map(x_real))                      # (S, T, H)
        h, _ = self.lstm(h_in)                                         # (S, T, H)
        scores = self.att_score(torch.tanh(self.att_hidden(h)))        # (S, T, 1)
        weights = torch.softmax(scores.float(), dim=1).to(h.dtype)     # (S, T, 1)  over time
        summary = (weights * h).sum(dim=1)                             # (S, H)
        return self.out(torch.cat([h[:, -1], summary], dim=-1)).squeeze(-1)  # (S,)
