"""TDrisk's risk aversion eta, chosen on the validation span (never on the test span).

    choose_eta(valid_predictions, bars, benchmark, etas, config) -> EtaChoice

TDrisk ranks by mu - eta * sigma. eta is in the units of the model's outputs, which predict the
CSRankNorm'd label, so its useful range depends on the model and the run: mu's daily
cross-sectional spread is far below sigma's typical level, and eta = 1 ranks almost by -sigma.
So each run's eta is chosen on its own validation predictions: every candidate (0 included,
which is TopK-Drop itself) is backtested there, and the one with the highest information ratio
of the excess return after costs wins (ties: the smaller eta). The test span is then traded once
with that eta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd

from fvae_dist.errors import ConfigError
from fvae_dist.evaluate.backtest import BacktestConfig, run_backtest

DEFAULT_ETAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CRITERION = ("excess_return_with_cost", "sum", "information_ratio")


@dataclass(frozen=True)
class EtaChoice:
    eta: float
    criterion: float
    candidates: pd.DataFrame  # eta, information ratio, annualised excess return (after costs)


def _score(summary: dict) -> float:
    section, mode, key = CRITERION
    value = summary[section][mode][key]
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def choose_eta(valid_predictions: pd.DataFrame, bars: pd.DataFrame, benchmark: pd.DataFrame,
               etas: Sequence[float] = DEFAULT_ETAS, config: BacktestConfig = BacktestConfig(),
               benchmark_code: str | None = "SH000300") -> EtaChoice:
    if not etas or any(not (isinstance(e, (int, float)) and e >= 0) for e in etas):
        raise ConfigError(f"TDrisk eta candidates {list(etas)}: expected a non-empty list of numbers >= 0")
    rows = []
    for eta in sorted(set(float(e) for e in etas)):
        result = run_backtest(valid_predictions, bars, benchmark, replace(config, strategy="tdrisk", eta=eta),
                              benchmark_code, source="validation predictions")
        summary = result.summary["excess_return_with_cost"]["sum"]
        rows.append({"eta": eta, "information_ratio": _score(result.summary),
                     "annualized_return": summary["annualized_return"]})
    table = pd.DataFrame(rows)
    best = table.sort_values(["information_ratio", "eta"], ascending=[False, True]).iloc[0]
    return EtaChoice(eta=float(best["eta"]), criterion=float(best["information_ratio"]), candidates=table)
