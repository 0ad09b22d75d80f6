"""Padded day batches for the model tests (FactorVAE and the baselines share one layout)."""
from __future__ import annotations

import pytest
import torch

from fvae_dist.errors import DataError


def make_batch(n_per_day: list[int], n_pad: int | None = None, T: int = 5, C: int = 4, seed: int = 0,
               garbage: float = float("nan")):
    """x (D, N, T, C), mask (D, N), y (D, N): real stocks first, padded slots hold `garbage`."""
    gen = torch.Generator().manual_seed(seed)
    N = n_pad or max(n_per_day)
    D = len(n_per_day)
    x = torch.full((D, N, T, C), garbage)
    y = torch.full((D, N), garbage)
    mask = torch.zeros(D, N, dtype=torch.bool)
    for d, n in enumerate(n_per_day):
        x[d, :n] = torch.randn(n, T, C, generator=gen)
        y[d, :n] = torch.randn(n, generator=gen)
        mask[d, :n] = True
    return x, mask, y


def widen_batch(x, mask, y, garbage: float):
    """The days of make_batch([6, 9, 3]) in a wider batch (N=14) whose padding holds `garbage`, day 0's
    stocks scattered over non-contiguous slots; returns x, mask, y and day 0's slots."""
    N = 14
    slots = torch.tensor([1, 4, 5, 8, 11, 13])
    x_wide = torch.full((3, N) + x.shape[2:], garbage)
    y_wide = torch.full((3, N), garbage)
    mask_wide = torch.zeros(3, N, dtype=torch.bool)
    x_wide[0, slots], y_wide[0, slots], mask_wide[0, slots] = x[0, :6], y[0, :6], True
    x_wide[1:, :9], y_wide[1:, :9], mask_wide[1:, :9] = x[1:], y[1:], mask[1:]
    return x_wide, mask_wide, y_wide, slots


def assert_rejects_bad_batches(model) -> None:
    """Every model's batch check (models.factorvae.check_batch) names the input that is wrong."""
    x, mask, y = make_batch([5, 3])
    with pytest.raises(DataError, match="input x"):
        model.predict(x[..., :3], mask)
    with pytest.raises(DataError, match="input mask"):
        model.predict(x, mask.float())
    with pytest.raises(DataError, match="input y"):
        model(x, mask, y[:, :2])
    empty_day = mask.clone()
    empty_day[1] = False
    with pytest.raises(DataError, match="at least one real stock"):
        model.predict(x, empty_day)


def train_on_random_days(model, x, mask, y, *, steps: int, lr: float, gen: torch.Generator, days_per_step: int = 4):
    """Adam for `steps` steps, each on `days_per_step` days of (x, mask, y) drawn with `gen`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        days = torch.randint(0, x.shape[0], (days_per_step,), generator=gen)
        loss = model(x[days], mask[days], y[days])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
