"""Qlib's benchmark processors, as pure functions over arrays and frames.

- RobustZScoreNorm: (x - median) / (1.4826 * MAD), statistics fitted on the training span only,
  then clipped to [-3, 3]. Qlib adds a tiny epsilon to the MAD before scaling so a constant
  feature does not divide by zero; we do the same.
- Fillna(0): after normalisation 0 is the training median, the least informative value.
- DropnaLabel: a training sample without a label teaches nothing; it is masked out when read.
- CSRankNorm of the label (training target only): per-day percentile rank, centred and scaled
  by 3.46 (= sqrt(12), the std of a uniform variable) so the target has roughly unit variance
  every day whatever the market did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MAD_TO_STD = 1.4826  # MAD of a normal variable times this is its standard deviation
MAD_EPSILON = 1e-12  # Qlib's EPS, added before scaling
UNIFORM_STD_INV = 3.46  # Qlib's CSRankNorm scale


@dataclass(frozen=True)
class RobustZScore:
    """Fitted statistics of RobustZScoreNorm; stored in manifest.json with the data set."""

    median: dict[str, float]
    scale: dict[str, float]
    clip: float = 3.0

    def to_json(self) -> dict:
        return {"method": "RobustZScoreNorm", "median": self.median, "scale": self.scale, "clip": self.clip}

    @classmethod
    def from_json(cls, blob: dict) -> "RobustZScore":
        return cls(median=dict(blob["median"]), scale=dict(blob["scale"]), clip=float(blob["clip"]))


def fit_robust_zscore(columns: dict[str, np.ndarray], clip: float = 3.0) -> RobustZScore:
    """Fit median and scaled MAD per feature on the training rows given (NaN ignored)."""
    median, scale = {}, {}
    for name, values in columns.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:  # a feature never observed in training: leave it centred at 0
            median[name], scale[name] = 0.0, 1.0
            continue
        med = float(np.median(values))
        mad = float(np.median(np.abs(values - med)))
        median[name], scale[name] = med, (mad + MAD_EPSILON) * MAD_TO_STD
    return RobustZScore(median=median, scale=scale, clip=clip)


def apply_robust_zscore(frame: pd.DataFrame, stats: RobustZScore) -> pd.DataFrame:
    """The frame with its feature columns normalised, clipped and Fillna(0) (float32); other columns as they were."""
    names = list(stats.median)
    normalised = np.empty((len(frame), len(names)), dtype=np.float32, order="F")
    for j, name in enumerate(names):
        values = frame[name].to_numpy(dtype=np.float64)
        # inf (e.g. a ratio over a zero volume) is as uninformative as NaN: both become 0 below
        values = np.where(np.isfinite(values), values, np.nan)
        z = np.clip((values - stats.median[name]) / stats.scale[name], -stats.clip, stats.clip)
        normalised[:, j] = np.nan_to_num(z, nan=0.0)
    # one block for all features (assigning 158 columns one by one would fragment the frame)
    features = pd.DataFrame(normalised, index=frame.index, columns=names, copy=False)
    return pd.concat([frame.drop(columns=names), features], axis=1)[list(frame.columns)]


def cs_rank_norm(values: np.ndarray, day_codes: np.ndarray) -> np.ndarray:
    """Per-day percentile rank (average ties), centred at 0 and scaled by 3.46; NaN stays NaN."""
    frame = pd.DataFrame({"day": day_codes, "v": values})
    ranks = frame.groupby("day")["v"].rank(pct=True).to_numpy()
    return ((ranks - 0.5) * UNIFORM_STD_INV).astype(np.float32)
