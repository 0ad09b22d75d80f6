"""In-training IC / Rank IC must agree with evaluate/metrics.py (Qlib's conventions)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fvae_dist.evaluate.metrics import daily_ic, summarize_ic
from fvae_dist.train.validation import SplitScores, day_correlations


def _random_days(seed=0, n_days=9, n_max=30):
    rng = np.random.default_rng(seed)
    score = rng.standard_normal((n_days, n_max)).astype(np.float32)
    label = (0.3 * score + rng.standard_normal((n_days, n_max))).astype(np.float32)
    label = np.round(label, 1)  # ties in the label, as real returns have
    mask = np.ones((n_days, n_max), dtype=bool)
    mask[1, 20:] = False  # ragged N
    label[2, :5] = np.nan  # missing labels
    score[3] = 0.5  # constant score: day skipped
    mask[4, 1:] = False  # one stock: day skipped
    return score, label, mask


def _as_frame(score, label, mask):
    d_idx, n_idx = np.nonzero(mask)
    dates = pd.bdate_range("2021-01-01", periods=score.shape[0])
    return pd.DataFrame({"date": dates[d_idx], "instrument": [f"S{i}" for i in n_idx],
                         "mu": score[d_idx, n_idx], "label": label[d_idx, n_idx]})


def test_day_correlations_match_daily_ic():
    score, label, mask = _random_days()
    ic, rank_ic = day_correlations(score, label, mask)
    expected = daily_ic(_as_frame(score, label, mask), "mu", "label")
    np.testing.assert_allclose(ic, expected["ic"].to_numpy(), atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(rank_ic, expected["rank_ic"].to_numpy(), atol=1e-6, equal_nan=True)
    assert np.isnan(ic[3]) and np.isnan(ic[4])


def test_summed_scores_equal_summarize_ic_even_when_split_over_workers():
    score, label, mask = _random_days(seed=1, n_days=12)
    out = {"loss": 1.0, "nll": 0.9, "kl": 0.1}
    halves = []
    for part in (slice(0, 5), slice(5, 12)):  # two "workers"
        scores = SplitScores()
        ic, rank_ic = day_correlations(score[part], label[part], mask[part])
        scores.add_batch(out, n_days=ic.size, n_stocks=int(mask[part].sum()), ic=ic, rank_ic=rank_ic)
        halves.append(scores)
    merged = SplitScores(**{k: getattr(halves[0], k) + getattr(halves[1], k) for k in vars(halves[0])})
    summary = merged.summary()
    expected = summarize_ic(daily_ic(_as_frame(score, label, mask), "mu", "label"))
    for key in ("ic", "icir", "rank_ic", "rank_icir"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-6), key
    assert summary["days"] == 12 and summary["loss"] == pytest.approx(1.0)


def test_summary_of_nothing_is_nan_not_an_error():
    summary = SplitScores().summary()
    assert math.isnan(summary["rank_ic"]) and math.isnan(summary["icir"])
