"""A seed ensemble: the mean of several runs' predictions (beyond the paper's tables).

    seed_ensemble(frames) -> date, instrument, mu, sigma[, label]

mu is the mean of the runs' mu over the stock-days every run predicted. sigma, where every run
has one, is the standard deviation of the equally weighted mixture of the runs' Gaussians,
sqrt(mean(sigma^2) + var(mu)): the ensemble's own predictive spread, which TDrisk can rank by.
Point-forecast baselines (sigma NaN) give sigma NaN.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from fvae_dist.errors import DataError
from fvae_dist.evaluate.metrics import require_columns

KEYS = ["date", "instrument"]


def seed_ensemble(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    if len(frames) < 2:
        raise DataError(f"seed_ensemble: needs the predictions of at least 2 runs, got {len(frames)}")
    for k, frame in enumerate(frames):
        require_columns(frame, [*KEYS, "mu"], f"predictions of run {k}")
    merged = frames[0][KEYS + [c for c in ("label",) if c in frames[0].columns]].copy()
    mus, sigmas = [], []
    for k, frame in enumerate(frames):
        part = frame[KEYS + ["mu"] + (["sigma"] if "sigma" in frame.columns else [])]
        part = part.rename(columns={"mu": f"mu_{k}", "sigma": f"sigma_{k}"})
        merged = merged.merge(part, on=KEYS, how="inner")
        mus.append(f"mu_{k}")
        sigmas.append(f"sigma_{k}")
    mu = merged[mus].to_numpy(dtype=np.float64)
    out = merged[[c for c in merged.columns if c in (*KEYS, "label")]].copy()
    out["mu"] = mu.mean(axis=1)
    if all(name in merged.columns for name in sigmas):
        sigma = merged[sigmas].to_numpy(dtype=np.float64)
        out["sigma"] = np.sqrt(np.mean(sigma**2, axis=1) + mu.var(axis=1))
    else:
        out["sigma"] = np.nan
    return out.sort_values(KEYS).reset_index(drop=True)
