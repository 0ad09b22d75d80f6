"""GRU (Chung et al. 2014): stacked GRU over the stock's window, linear head on the last state
(Qlib's GRU benchmark: d_feat -> GRU(hidden_size, num_layers, dropout) -> fc_out)."""
from __future__ import annotations

from torch import Tensor, nn

from fvae_dist.models.baselines.common import PerStockModel


class GRUEncoder(nn.Module):
    """(S, T, C) -> (S, H): the last step's output of a stacked GRU (shared with GAT)."""

    def __init__(self, cfg):
        super().__init__()
        # nn.GRU applies dropout between layers only; with one layer it would only warn
        dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.gru = nn.GRU(cfg.num_features, cfg.hidden_size, num_layers=cfg.num_layers,
                          dropout=dropout, batch_first=True)

    def forward(self, x_real: Tensor) -> Tensor:
        out, _ = self.gru(x_real)                                      # (S, T, H)
        return out[:, -1]                                              # (S, H)


class GRUBaseline(PerStockModel):
    label = "GRU"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        self.encoder = GRUEncoder(cfg)
        self.out = nn.Linear(cfg.hidden_size, 1)

    def score_real(self, x_real: Tensor) -> Tensor:
        return self.out(self.encoder(x_real)).squeeze(-1)              # (S,)
