"""Small hand-made bars, benchmarks and predictions for the evaluate tests."""
from __future__ import annotations

import pandas as pd
import pytest


def long_bars(dates, closes: dict, volumes: dict | None = None, factors: dict | None = None, missing=()) -> pd.DataFrame:
    """Long bars from {instrument: [close per date]}; volumes/factors override per instrument,
    `missing` lists (instrument, date index) pairs that get no row at all."""
    rows = []
    for instrument, series in closes.items():
        for k, (date, close) in enumerate(zip(dates, series)):
            if (instrument, k) in missing:
                continue
            volume = (volumes or {}).get(instrument, [1e6] * len(dates))[k]
            factor = (factors or {}).get(instrument, 1.0)
            rows.append(
                {"date": pd.Timestamp(date), "instrument": instrument, "open": close, "high": close,
                 "low": close, "close": close, "volume": volume, "factor": factor}
            )
    return pd.DataFrame(rows)


def benchmark_frame(dates, closes, code: str = "SH000300") -> pd.DataFrame:
    return pd.DataFrame({"date": pd.to_datetime(list(dates)), "instrument": code, "close": closes})


def predictions_frame(scores: dict) -> pd.DataFrame:
    """{date: {instrument: mu}} -> date, instrument, mu, sigma (sigma 1)."""
    rows = [
        {"date": pd.Timestamp(date), "instrument": instrument, "mu": mu, "sigma": 1.0}
        for date, by_stock in scores.items()
        for instrument, mu in by_stock.items()
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def market_helpers():
    return long_bars, benchmark_frame, predictions_frame


@pytest.fixture
def run_command():
    """Parse argv with only the given command module's subparser (as cli.py registers it) and run it.

    Kept independent of fvae_dist.cli so these tests do not depend on the other commands importing."""
    import argparse

    def run(module, argv):
        parser = argparse.ArgumentParser(prog="fvae-dist")
        module.add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(argv)
        return args.func(args)

    return run
