"""Linear: one linear layer on the stock's whole flattened window (the paper's linear baseline;
Qlib's Linear benchmark is a linear regression on one day's Alpha158 features, here the model
sees the same T x C window as every other model)."""
from __future__ import annotations

from torch import Tensor, nn

from fvae_dist.errors import DataError
from fvae_dist.models.baselines.common import PerStockModel


class LinearBaseline(PerStockModel):
    """y_hat = w . vec(x_window) + b, with vec() over the T * C values of the window."""

    label = "Linear"

    def __init__(self, cfg):
        super().__init__(cfg.num_features)
        self.seq_len = cfg.seq_len
        self.out = nn.Linear(cfg.seq_len * cfg.num_features, 1)

    def score_real(self, x_real: Tensor) -> Tensor:
        S, T, C = x_real.shape
        if T != self.seq_len:
            # the weights are per time step, so unlike the recurrent models T is fixed
            raise DataError(f"Linear input x: windows of T={T} steps, but model.seq_len={self.seq_len}; "
                            "set model.seq_len to the data set's window length")
        return self.out(x_real.reshape(S, T * C)).squeeze(-1)          # (S,)
