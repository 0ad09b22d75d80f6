"""What every baseline shares: the batch checks, the loss, scattering real stocks back to days.

The baselines are point forecasts trained on the mean squared error of the CSRankNorm'd label,
as in Qlib's benchmarks (loss: mse). They plug into FactorVAE's training path unchanged:
    forward(x, mask, y, weight=None) -> {"loss": MSE, "nll": MSE, "kl": 0}
        the loop logs "loss", "nll" and "kl" for every model; a point forecast has no
        likelihood and no KL, so its "nll" slot carries the MSE and "kl" is 0.
    predict(x, mask) -> (mu, sigma), (D, N)
        mu is 0 at padding, like FactorVAE's; sigma is NaN everywhere, padding included: a
        baseline has no risk estimate, and NaN (rather than 0 or a constant) makes every
        consumer that needs one (TDrisk, the calibration plot) notice instead of ranking on it.
The loss is the mean over each day's real stocks, then over days, so each day weighs the same
(the same weighting as FactorVAE's eq. 17; `weight`, per stock, as FactorVAE's: train.index_share).

Per-stock models (linear, gru, alstm, trans, sfm) see only the real stocks, x[mask] (S, T, C),
as FactorVAE's feature extractor does: padded slots cost nothing and whatever they hold never
enters the network. Cross-stock models (gat, ca) restrict every sum over stocks to the mask.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fvae_dist.models.factorvae import check_batch, masked_mean_over_stocks  # noqa: F401  (re-exported)


def scatter_to_days(values: Tensor, mask: Tensor) -> Tensor:
    """(S, ...) values of the real stocks -> (D, N, ...), 0 at padding."""
    out = values.new_zeros(tuple(mask.shape) + tuple(values.shape[1:]))
    out[mask] = values
    return out


def masked_mse(pred: Tensor, y: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """(D, N) -> (D,): mean squared error over each day's real stocks, in float32 (weighted by
    `weight` (D, N) when given: train.index_share). Padded labels may be NaN; they are replaced
    before the subtraction so no NaN reaches a gradient."""
    y = torch.where(mask, y.float(), 0.0)
    pred = torch.where(mask, pred.float(), 0.0)
    return masked_mean_over_stocks((pred - y).square(), mask, weight)


def point_forecast_losses(pred: Tensor, y: Tensor, mask: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
    """The loop's three scalars for a point forecast: loss = nll = MSE, kl = 0."""
    mse = masked_mse(pred, y, mask, weight).mean()
    return {"loss": mse, "nll": mse, "kl": torch.zeros_like(mse)}


def no_risk_estimate(mu: Tensor) -> Tensor:
    """sigma of a point forecast: NaN everywhere (see the module docstring)."""
    return torch.full_like(mu, float("nan"))


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype inputs must have: the weights' (DeepSpeed's bf16 mode casts the weights
    themselves and still feeds float32 batches; under autocast the weights stay float32)."""
    return next(module.parameters()).dtype


class PointForecastBaseline(nn.Module):
    """A baseline that scores each day's stocks with no risk estimate: subclasses define scores."""

    label = "baseline"

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def scores(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (D, N, T, C), mask (D, N) -> (D, N) predicted label, 0 at padding."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor, y: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
        check_batch(self.label, self.num_features, x, mask, y)
        return point_forecast_losses(self.scores(x, mask), y, mask, weight)

    def predict(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """mu (D, N), 0 at padding; sigma NaN (no risk estimate). Never reads y."""
        check_batch(self.label, self.num_features, x, mask)
        mu = self.scores(x, mask)
        return mu, no_risk_estimate(mu)


class PerStockModel(PointForecastBaseline):
    """A baseline that scores each stock from its own window: subclasses define score_real."""

    def score_real(self, x_real: Tensor) -> Tensor:
        """(S, T, C) windows of real stocks -> (S,) predicted label."""
        raise NotImplementedError

    def scores(self, x: Tensor, mask: Tensor) -> Tensor:
        x_real = x[mask].to(input_dtype(self))                         # (S, T, C) real stocks only
        return scatter_to_days(self.score_real(x_real).float(), mask)  # (D, N), 0 at padding
