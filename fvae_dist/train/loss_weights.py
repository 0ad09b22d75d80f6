"""Per-stock loss weights that favour an index's members (train.index_share): beyond the paper.

The paper fits FactorVAE on all A-shares with every stock weighing the same in eq. 17, and
builds its portfolios from CSI300's members. Trained that way, the model serves the members less
well than one trained on CSI300 alone (docs/results.md). A weighting keeps the whole market in
every cross-section (the encoder's portfolios, the attention and the factors still see all
stocks) and moves the loss towards the members:

    on a day with n_m members and n_o other stocks (N = n_m + n_o), share s:
        w = N * s / n_m        for a member
        w = N * (1 - s) / n_o  for any other stock

so the members carry the share s of the day's loss, the weights average 1 over the day (the
loss keeps its scale, and gamma its meaning), and s = n_m / N gives every stock weight 1. A day
without members, or with nothing but members, keeps weight 1 everywhere.

    weights = IndexMemberWeights(read_membership(path), share)
    weights(batch) -> (D, N) float32, 0 at padding   (batch: collate_with_dates' dict)
"""
from __future__ import annotations

import numpy as np
import pandas as pd


class IndexMemberWeights:
    """Each training batch's weights from a point-in-time membership table."""

    def __init__(self, membership: pd.DataFrame, share: float):
        """share: train.index_share, in [0, 1] (TrainConfig checks it)."""
        self.share = float(share)
        self._instrument = membership["instrument"].astype(str).to_numpy()
        self._start = membership["start_date"].to_numpy("datetime64[D]")
        self._end = membership["end_date"].to_numpy("datetime64[D]")

    def members_on(self, date) -> np.ndarray:
        """The instruments in the index on `date` (a numpy datetime64 or a string)."""
        day = np.datetime64(date, "D")
        return self._instrument[(self._start <= day) & (day <= self._end)]

    def day_weights(self, instruments: np.ndarray, date) -> np.ndarray:
        """(n,) weights for one day's stocks, in the order given."""
        member = np.isin(np.asarray(instruments, dtype=str), self.members_on(date))
        n, n_members = len(member), int(member.sum())
        weights = np.ones(n, dtype=np.float32)
        if 0 < n_members < n:
            weights[member] = n * self.share / n_members
            weights[~member] = n * (1.0 - self.share) / (n - n_members)
        return weights

    def __call__(self, batch: dict) -> np.ndarray:
        """(D, N) weights of a padded batch: day d's stocks fill its first slots (collate_days)."""
        weights = np.zeros(batch["mask"].shape, dtype=np.float32)
        for d, (instruments, date) in enumerate(zip(batch["instruments"], batch["date"])):
            weights[d, : len(instruments)] = self.day_weights(instruments, date)
        return weights
