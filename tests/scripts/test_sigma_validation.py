"""scripts/sigma_validation.py: the figures that say whether sigma ranks risk (RQ3's evidence)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.scripts.conftest import SCRIPTS, load_script

SCRIPT = SCRIPTS / "sigma_validation.py"


@pytest.fixture(scope="module")
def script():
    return load_script("sigma_validation")


def _market(seed: int, days: int = 8, stocks: int = 120) -> pd.DataFrame:
    """Stocks whose next-day move scales with a known risk; mu knows part of the return."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2018-01-02", periods=days)
    frame = pd.DataFrame([(d, f"S{k:03d}") for d in dates for k in range(stocks)], columns=["date", "instrument"])
    risk = rng.uniform(0.5, 3.0, len(frame))
    signal = rng.standard_normal(len(frame))
    frame["label"] = 0.01 * (0.3 * signal + risk * rng.standard_normal(len(frame)))
    frame["mu"] = signal
    frame["sigma"] = risk
    return frame


def test_a_sigma_that_is_the_true_risk_ranks_the_moves_and_lowers_the_top_picks_risk(script):
    figures = script.sigma_figures(_market(0))
    assert 0.3 < figures["sigma_vs_move"] < 0.9                 # the move is |noise| times risk
    assert abs(figures["sigma_vs_mu"]) < 0.1                    # drawn independently
    assert figures["mu_vs_return"] > 0.03
    moves = [figures[f"top50_move_eta{eta:g}"] for eta in script.ETAS]
    assert moves == sorted(moves, reverse=True) and moves[-1] < 0.95 * moves[0]
    shuffled = _market(0).assign(sigma=lambda f: np.random.default_rng(1).permutation(f["sigma"].to_numpy()))
    assert abs(script.sigma_figures(shuffled)["sigma_vs_move"]) < 0.1


def test_the_command_writes_markdown_and_json_over_runs_and_members(tmp_path):
    for seed in (0, 1):
        run = tmp_path / f"run{seed}" / "predictions"
        run.mkdir(parents=True)
        _market(seed).to_parquet(run / "valid.parquet")
    members = tmp_path / "members.csv"
    pd.DataFrame({"instrument": [f"S{k:03d}" for k in range(60)], "start_date": "2000-01-01",
                  "end_date": "2100-01-01"}).to_csv(members, index=False)
    out = tmp_path / "sigma"
    subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path / "run0"), str(tmp_path / "run1"),
                    "--membership", str(members), "--out", str(out)], check=True, capture_output=True, timeout=300)
    document = json.loads(Path(f"{out}.json").read_text())
    assert set(document["per_run"]) == {"run0", "run1"}
    assert document["per_run"]["run0"]["index members"]["stock_days"] == 60 * 8
    assert "| Spearman(sigma, move), daily mean |" in Path(f"{out}.md").read_text()
    missing = subprocess.run([sys.executable, str(SCRIPT), "--runs", str(tmp_path / "run0"), "--split", "test",
                              "--membership", str(members), "--out", str(out)], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "test.parquet: no predictions for split 'test'" in missing.stderr
