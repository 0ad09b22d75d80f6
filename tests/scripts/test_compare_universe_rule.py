"""scripts/compare_universe_rule.py: the row sets it scores each model on."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.scripts.conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "compare_universe_rule.py"


@pytest.fixture(scope="module")
def script():
    return load_script("compare_universe_rule")


def _predictions(rng, days=6, stocks=30):
    dates = pd.bdate_range("2018-01-02", periods=days)
    frame = pd.DataFrame([(d, f"S{k:03d}") for d in dates for k in range(stocks)], columns=["date", "instrument"])
    frame["label"] = rng.standard_normal(len(frame))
    return frame


def test_scores_each_model_on_the_same_rows_and_splits_off_the_padded_only_rows(script):
    rng = np.random.default_rng(0)
    padded = _predictions(rng)
    padded["mu"] = padded["label"] + rng.standard_normal(len(padded))        # informative everywhere
    full = padded.assign(mu=rng.standard_normal(len(padded)))                  # noise
    dropped = padded["instrument"] >= "S025"                                   # five "new listings"
    full.loc[~dropped, "mu"] = full.loc[~dropped, "label"] * 3 + rng.standard_normal((~dropped).sum())
    full_rows = full.loc[~dropped].reset_index(drop=True)
    membership = pd.DataFrame({"instrument": ["S000", "S001", "S002", "S003", "S004", "S005"],
                               "start_date": "2000-01-01", "end_date": "2100-01-01"})
    result = script.compare(padded, full, full_rows, membership)
    assert result["every padded row"]["padded"]["stock_days"] == len(padded)
    assert result["full-window rows"]["padded"]["stock_days"] == (~dropped).sum()
    assert result["rows only padded keeps"]["full-window"]["stock_days"] == dropped.sum()
    assert result["index members"]["padded"]["stock_days"] == 6 * 6
    # the full-window model is better where both rules agree and no better than chance where it never trained
    assert result["full-window rows"]["full-window"]["rank_ic"] > result["full-window rows"]["padded"]["rank_ic"]
    assert abs(result["rows only padded keeps"]["full-window"]["rank_ic"]) < result["rows only padded keeps"]["padded"]["rank_ic"]
    with pytest.raises(ValueError, match="differ in length"):
        script.compare(padded, full.iloc[:-1], full_rows, membership)
