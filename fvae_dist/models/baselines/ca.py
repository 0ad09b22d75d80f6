"""CA, the conditional autoencoder of Gu, Kelly and Xiu (2021): a dynamic factor model whose
exposures are a neural network of the stocks' characteristics.

    beta_i   = MLP(z_i)                                  (K) z_i: stock i's characteristics at the
                                                         window's last step (num_layers hidden
                                                         layers of hidden_size, ReLU; then K outputs)
    x_p      = (Z^T Z + ridge)^-1 Z^T y                  (C) the day's characteristic-managed
                                                         portfolios, over its real stocks
    f        = W_f x_p + b_f                             (K) factors: a linear map of the portfolios
    y_hat_i  = beta_i^T f                                training: reconstruct the day's returns
Prediction cannot use the day's f (it is built from y): like GKX's out-of-sample forecast it uses
beta_i^T lambda, lambda the mean of the factors seen in training. lambda is a buffer, updated
in train mode only (see ModelConfig.ca_lambda_momentum) and saved in the state_dict, so a
checkpoint carries it; under data parallelism each step's mean is averaged over the workers
first, so every worker holds the same lambda.

The (C, C) systems are formed and solved in float64 (small and possibly ill-conditioned, as in
FactorVAE-port). GKX's exposures use a firm-characteristics panel; here the characteristics
are the window's last-step features."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fvae_dist.models.baselines.common import (
    check_batch,
    input_dtype,
    no_risk_estimate,
    point_forecast_losses,
    scatter_to_days,
)


def managed_portfolios(z: Tensor, y: Tensor, mask: Tensor, ridge: float) -> Tensor:
    """x_p (D, C) = (Z^T Z + ridge * mean diag * I)^-1 Z^T y per day, over its real stocks."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = torch.where(mask[..., None], z.double(), 0.0)              # (D, N, C) padding may hold NaN
        y = torch.where(mask, y.double(), 0.0)                         # (D, N)
        gram = z.transpose(1, 2) @ z                                   # (D, C, C)  Z^T Z
        moment = torch.einsum("dnc,dn->dc", z, y)                      # (D, C)     Z^T y
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)              # (D,)
        lam = ridge * scale + torch.finfo(gram.dtype).tiny             # (D,) > 0 even when Z = 0
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + lam[:, None, None] * eye, moment).float()


class CABaseline(nn.Module):
    label = "CA"

    def __init__(self, cfg):
        super().__init__()
        C, H, K = cfg.num_features, cfg.hidden_size, cfg.num_factors
        self.num_features = C
        self.ridge = cfg.ca_ridge
        self.momentum = cfg.ca_lambda_momentum
        layers: list[nn.Module] = []
        width = C
        for _ in range(cfg.num_layers):
            layers += [nn.Linear(width, H), nn.ReLU()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = H
        layers.append(nn.Linear(width, K))
        self.beta_net = nn.Sequential(*layers)
        self.factor_net = nn.Linear(C, K)                              # W_f, b_f
        self.register_buffer("factor_mean", torch.zeros(K))            # lambda
        self.register_buffer("factor_updates", torch.zeros((), dtype=torch.long))

    def characteristics(self, x: Tensor) -> Tensor:
        return x[:, :, -1, :]                                          # (D, N, C) the last step

    def exposures(self, x: Tensor, mask: Tensor) -> Tensor:
        """beta (D, N, K), 0 at padding."""
        z_real = self.characteristics(x)[mask].to(input_dtype(self))   # (S, C) real stocks only
        return scatter_to_days(self.beta_net(z_real).float(), mask)    # (D, N, K)

    def factors(self, x: Tensor, mask: Tensor, y: Tensor) -> Tensor:
        """f (D, K): the day's factors from its managed portfolios (reads y: training only)."""
        x_p = managed_portfolios(self.characteristics(x), y, mask, self.ridge)  # (D, C)
        return self.factor_net(x_p.to(input_dtype(self))).float()      # (D, K)

    def forward(self, x: Tensor, mask: Tensor, y: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        check_batch(self.label, self.num_features, x, mask, y)
        beta = self.exposures(x, mask)                                 # (D, N, K)
        f = self.factors(x, mask, y)                                   # (D, K)
        if self.training:
            self._update_factor_mean(f.detach())
        pred = (beta * f[:, None, :]).sum(dim=-1)                      # (D, N)
        return point_forecast_losses(pred, y, mask, weight)

    def predict(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """mu = beta lambda (D, N), 0 at padding; sigma NaN (no risk estimate). Never reads y."""
        check_batch(self.label, self.num_features, x, mask)
        beta = self.exposures(x, mask)
        mu = (beta * self.factor_mean.float()).sum(dim=-1)             # (D, N), 0 at padding
        return mu, no_risk_estimate(mu)

    @torch.no_grad()
    def _update_factor_mean(self, f: Tensor) -> None:
        step_mean = f.float().mean(dim=0)                              # (K,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every worker runs the same number of training steps, so this collective pairs up
            dist.all_reduce(step_mean)
            step_mean /= dist.get_world_size()
        n = int(self.factor_updates)
        weight = max(self.momentum, 1.0 / (n + 1))                     # plain mean first, then EMA
        mean = self.factor_mean.float()
        self.factor_mean.copy_(mean + weight * (step_mean - mean))
        self.factor_updates += 1
