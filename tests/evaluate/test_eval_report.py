"""`fvae-dist report` on fake run folders: numbers trace back to the inputs, plots exist and carry ink."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread
from scipy import stats

from fvae_dist.commands import report as report_command
from fvae_dist.evaluate.backtest import BacktestConfig, run_backtest, write_result
from fvae_dist.evaluate.metrics import realised_label

DATES = pd.bdate_range("2021-02-01", periods=70)
STOCKS = [f"SH60{k:04d}" for k in range(24)]


@pytest.fixture
def market(tmp_path, market_helpers):
    long_bars, benchmark_frame, _ = market_helpers
    rng = np.random.default_rng(11)
    closes = {s: list(10 * np.cumprod(1 + rng.normal(0.0005, 0.02, len(DATES)))) for s in STOCKS}
    bars = long_bars(DATES, closes)
    bench = benchmark_frame(DATES, list(3000 * np.cumprod(1 + rng.normal(0, 0.01, len(DATES)))))
    bars_path, bench_path = tmp_path / "bars.parquet", tmp_path / "index.parquet"
    bars.to_parquet(bars_path)
    bench.to_parquet(bench_path)
    return bars, bench, bars_path, bench_path


def _write_run(folder, config: dict, predictions: pd.DataFrame, manifest: str = "abc123") -> None:
    (folder / "predictions").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"test": {"rank_ic": 0.0}}))
    (folder / "manifest_hash.txt").write_text(manifest + "\n")
    predictions.to_parquet(folder / "predictions" / "test.parquet")


def _predictions(bars: pd.DataFrame, skill: float, seed: int, with_sigma: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = realised_label(bars)
    label = label[label["date"] <= DATES[-3]]
    sigma = np.exp(rng.normal(-4.0, 0.5, len(label))) if with_sigma else np.full(len(label), 0.02)
    mu = skill * label["label"].to_numpy() + rng.normal(0, 1, len(label)) * sigma
    return label.assign(mu=mu, sigma=sigma)


def _expected_rank_ic(predictions: pd.DataFrame) -> tuple[float, float]:
    daily = [stats.spearmanr(day["mu"], day["label"])[0] for _, day in predictions.groupby("date")]
    return float(np.mean(daily)), float(np.mean(daily) / np.std(daily, ddof=1))


@pytest.fixture
def runs(tmp_path, market):
    bars = market[0]
    root = tmp_path / "runs"
    made = {
        "fvae-0": ({"model": {"name": "FactorVAE"}, "seed": 0}, _predictions(bars, 0.5, 0, True)),
        "fvae-1": ({"model": {"name": "FactorVAE"}, "seed": 1}, _predictions(bars, 0.5, 1, True)),
        "gru-0": ({"name": "GRU", "seed": 0}, _predictions(bars, 0.1, 2, False)),
    }
    for name, (config, predictions) in made.items():
        _write_run(root / name, config, predictions, manifest=f"hash-{name}")
    robustness = pd.DataFrame(
        {"model": ["FactorVAE"] * 4 + ["GRU"] * 2, "m": [50, 50, 100, 100, 50, 100], "seed": [0, 1, 0, 1, 0, 0],
         "rank_ic": [0.05, 0.07, 0.04, 0.06, 0.03, 0.02], "rank_icir": [0.3, 0.5, 0.2, 0.4, 0.1, 0.2]}
    )
    (root / "robustness").mkdir()
    robustness.to_csv(root / "robustness" / "results.csv", index=False)
    return root, {name: predictions for name, (_, predictions) in made.items()}


def _row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def test_report_tables_come_from_the_inputs(tmp_path, market, runs, run_command):
    _, _, bars_path, bench_path = market
    root, predictions = runs
    bars, bench = market[0], market[1]
    out = tmp_path / "report"
    argv = ["report", "--runs", str(root), "--out", str(out), "--bars", str(bars_path), "--benchmark", str(bench_path),
            "--topk", "5", "--n-drop", "2", "--eta", "0.5"]
    assert run_command(report_command, argv) == 0
    text = (out / "report.md").read_text()

    # Table 1: mean (std, ddof=1) over the two FactorVAE seeds of scipy's daily Spearman
    seeds = [_expected_rank_ic(predictions[name]) for name in ("fvae-0", "fvae-1")]
    ric, ricir = np.array(seeds).T
    assert _row(text, "FactorVAE")[1:4] == [
        f"{ric.mean():.3f} ({ric.std(ddof=1):.3f})", f"{ricir.mean():.3f} ({ricir.std(ddof=1):.3f})", "2"
    ]
    gru_ic, gru_icir = _expected_rank_ic(predictions["gru-0"])
    assert _row(text, "GRU")[1:4] == [f"{gru_ic:.3f}", f"{gru_icir:.3f}", "1"]

    # Table 2 straight from robustness/results.csv
    assert _row(text, "FactorVAE")[0] == "FactorVAE"
    table2 = text.split("## Table 2")[1].split("## Table 3")[0]
    assert _row(table2, "FactorVAE")[1:] == ["0.060 (0.014)", "0.400 (0.141)", "0.050 (0.014)", "0.300 (0.141)"]
    assert _row(table2, "GRU")[1:] == ["0.030", "0.100", "0.020", "0.200"]

    # Table 3: the same backtest run here; TDrisk only where sigma is informative
    table3 = text.split("## Table 3")[1].split("Compounded variant")[0]
    config = BacktestConfig(topk=5, n_drop=2, eta=0.5)
    gru = run_backtest(predictions["gru-0"], bars, bench, config).summary
    with_cost = gru["excess_return_with_cost"]["sum"]
    assert _row(table3, "GRU")[4:] == [
        f"{with_cost['annualized_return'] * 100:.2f}%", f"{with_cost['information_ratio']:.2f}",
        f"{abs(with_cost['max_drawdown']) * 100:.2f}%",
    ]
    tdrisk = [
        run_backtest(predictions[n], bars, bench, BacktestConfig(topk=5, n_drop=2, eta=0.5, strategy="tdrisk")).summary
        for n in ("fvae-0", "fvae-1")
    ]
    ar = [s["excess_return_without_cost"]["sum"]["annualized_return"] * 100 for s in tdrisk]
    assert _row(table3, "FactorVAE (TDrisk)")[1] == f"{np.mean(ar):.2f}% ({np.std(ar, ddof=1):.2f}%)"
    assert "GRU (TDrisk)" not in text
    assert "Warning: the backtests were run with different settings" not in text

    # reproducibility: every run, its data hash and the data files are named
    for name in ("fvae-0", "fvae-1", "gru-0"):
        assert str(root / name) in text and f"hash-{name}" in text
    assert str(bars_path) in text and "SH000300" in text
    assert json.loads((out / "report.json").read_text())["table1"]["GRU"]["seeds"] == [0]

    for png in ("portfolio.png", "rank_ic.png", "calibration.png"):
        image = imread(out / png)
        assert image.shape[0] > 400 and image.shape[1] > 400
        # a blank or single-colour canvas has (almost) no spread of pixel values
        assert image[..., :3].std() > 0.05, png


def test_report_tolerates_missing_parts(tmp_path, market, runs, run_command):
    bars, bench, _, _ = market
    root, predictions = runs
    (root / "robustness" / "results.csv").unlink()
    # one run brings its own backtest; no bars are given, so the others get none
    own = run_backtest(predictions["gru-0"], bars, bench, BacktestConfig(topk=4, n_drop=1))
    write_result(own, root / "gru-0" / "backtest")
    (root / "fvae-1" / "predictions" / "test.parquet").unlink()  # Table 1 falls back to metrics.json
    out = tmp_path / "report"
    assert run_command(report_command, ["report", "--runs", str(root / "gru-0"), str(root / "fvae-1"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "_Omitted: no robustness/results.csv" in text
    table3 = text.split("## Table 3")[1].split("Compounded variant")[0]
    ar = own.summary["excess_return_with_cost"]["sum"]["annualized_return"]
    assert _row(table3, "GRU")[4] == f"{ar * 100:.2f}%"
    assert f"No backtest for: {root / 'fvae-1'}" in text
    assert _row(text, "FactorVAE")[1:4] == ["0.000", "n/a", "1"]
    assert (out / "portfolio.png").is_file() and not (out / "calibration.png").exists()

    bare = tmp_path / "bare"
    assert run_command(report_command, ["report", "--runs", str(root / "fvae-0"), "--out", str(bare)]) == 0
    assert "Omitted: no run has a backtest/ folder" in (bare / "report.md").read_text()


def test_report_rejects_a_folder_without_runs(tmp_path, run_command):
    from fvae_dist.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a run folder"):
        run_command(report_command, ["report", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_calibration_bins_put_a_calibrated_model_on_the_diagonal():
    from fvae_dist.evaluate.report import calibration_bins, calibration_units

    rng = np.random.default_rng(5)
    n = 40_000
    sigma = np.exp(rng.uniform(np.log(0.01), np.log(0.05), n))
    frame = pd.DataFrame({"date": np.repeat(pd.bdate_range("2021-01-04", periods=100), n // 100),
                          "mu": 0.0, "sigma": sigma, "label": rng.normal(0, 1, n) * sigma})
    table = calibration_bins(frame, "label", 8)
    assert len(table) == 8 and table["n"].sum() == n
    assert np.allclose(table["rms_error"], table["mean_sigma"], rtol=0.06)
    assert table["mean_sigma"].is_monotonic_increasing
    assert calibration_units(frame) == "raw"
    assert calibration_units(frame.assign(sigma=frame["sigma"] * 40)) == "csranknorm"


def test_report_warns_when_backtest_settings_differ(tmp_path, market, runs, run_command):
    bars, bench, _, _ = market
    root, predictions = runs
    for name, topk in (("fvae-0", 5), ("gru-0", 4)):
        write_result(run_backtest(predictions[name], bars, bench, BacktestConfig(topk=topk, n_drop=1)), root / name / "backtest")
    out = tmp_path / "report"
    assert run_command(report_command, ["report", "--runs", str(root / "fvae-0"), str(root / "gru-0"), "--out", str(out)]) == 0
    assert "different settings (topk: 4 / 5)" in (out / "report.md").read_text()
