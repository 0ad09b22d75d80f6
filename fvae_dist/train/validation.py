"""Validation inside training: eq. 17's loss terms and daily IC / Rank IC, summed across workers.

The IC conventions are those of evaluate/metrics.py (Qlib's): per day, over the stocks whose
score and label are finite, IC = Pearson and Rank IC = Spearman with average ranks for ties; a
day with fewer than 2 such stocks or a constant score or label is skipped; the summary is the
mean over days and ICIR = mean / std (ddof=1). Each worker scores its own days; the sums
(count, sum, sum of squares) are all-reduced so the result equals one pass over all days.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import rankdata


def day_correlations(score: np.ndarray, label: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D, N) arrays -> per-day IC and Rank IC, (D,) each, NaN on skipped days."""
    n_days = score.shape[0]
    ic = np.full(n_days, np.nan)
    rank_ic = np.full(n_days, np.nan)
    for d in range(n_days):
        x = score[d].astype(np.float64)
        y = label[d].astype(np.float64)
        keep = mask[d] & np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size < 2 or x.max() == x.min() or y.max() == y.min():
            continue
        ic[d] = _pearson(x, y)
        rank_ic[d] = _pearson(rankdata(x), rankdata(y))
    return ic, rank_ic


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float(np.clip((dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)), -1.0, 1.0))


@dataclass
class SplitScores:
    """Additive statistics of one pass over a split (or one worker's part of it)."""

    days: float = 0.0
    stock_days: float = 0.0
    loss_sum: float = 0.0
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    ic_days: float = 0.0
    ic_sum: float = 0.0
    ic_sumsq: float = 0.0
    rank_ic_sum: float = 0.0
    rank_ic_sumsq: float = 0.0

    def add_batch(self, out: dict, n_days: int, n_stocks: int, ic: np.ndarray, rank_ic: np.ndarray) -> None:
        self.days += n_days
        self.stock_days += n_stocks
        # the model averages over the batch's days: times D gives the per-day sum
        self.loss_sum += float(out["loss"]) * n_days
        self.nll_sum += float(out["nll"]) * n_days
        self.kl_sum += float(out["kl"]) * n_days
        valid = np.isfinite(ic) & np.isfinite(rank_ic)
        self.ic_days += float(valid.sum())
        self.ic_sum += float(ic[valid].sum())
        self.ic_sumsq += float(np.square(ic[valid]).sum())
        self.rank_ic_sum += float(rank_ic[valid].sum())
        self.rank_ic_sumsq += float(np.square(rank_ic[valid]).sum())

    def all_reduce(self) -> "SplitScores":
        """Sum over all workers (a no-op without a process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        names = [f.name for f in fields(self)]
        packed = torch.tensor([getattr(self, name) for name in names], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            packed = packed.cuda()
        dist.all_reduce(packed)
        return SplitScores(**dict(zip(names, packed.cpu().tolist())))

    def summary(self) -> dict[str, float]:
        days = max(self.days, 1.0)
        ic, icir = _mean_and_ratio(self.ic_sum, self.ic_sumsq, self.ic_days)
        rank_ic, rank_icir = _mean_and_ratio(self.rank_ic_sum, self.rank_ic_sumsq, self.ic_days)
        return {
            "loss": self.loss_sum / days,
            "nll": self.nll_sum / days,
            "kl": self.kl_sum / days,
            "ic": ic,
            "icir": icir,
            "rank_ic": rank_ic,
            "rank_icir": rank_icir,
            "days": int(self.days),
            "stock_days": int(self.stock_days),
        }


def _mean_and_ratio(total: float, total_sq: float, n: float) -> tuple[float, float]:
    if n < 1:
        return math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.nan
    variance = max((total_sq - n * mean * mean) / (n - 1), 0.0)
    std = math.sqrt(variance)
    return mean, (mean / std if std > 0 else math.nan)


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], *, device: torch.device, autocast=contextlib.nullcontext) -> SplitScores:
    """One pass of `model` (the bare module, not its DDP wrapper) over this worker's batches.

    The loss comes from model(x, mask, y) in eval mode (factors at their mean); the scores for
    IC come from model.predict, the prediction path that never sees y."""
    was_training = model.training
    model.eval()
    scores = SplitScores()
    try:
        for batch in batches:
            x, mask, y = to_device(batch, device)
            with autocast():
                out = model(x, mask, y)
                mu, _ = model.predict(x, mask)
            ic, rank_ic = day_correlations(mu.float().cpu().numpy(), batch["label"], batch["mask"])
            scores.add_batch(out, n_days=x.shape[0], n_stocks=int(batch["mask"].sum()), ic=ic, rank_ic=rank_ic)
    finally:
        model.train(was_training)
    return scores


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    non_blocking = device.type == "cuda"
    x = torch.from_numpy(batch["x"]).to(device, non_blocking=non_blocking)
    mask = torch.from_numpy(batch["mask"]).to(device, non_blocking=non_blocking)
    y = torch.from_numpy(batch["y"]).to(device, non_blocking=non_blocking)
    return x, mask, y
