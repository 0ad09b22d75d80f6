"""Daily IC / Rank IC against scipy, the ICIR convention, LABEL0, and `fvae-dist evaluate`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fvae_dist.commands import evaluate as evaluate_command
from fvae_dist.errors import DataError
from fvae_dist.evaluate.metrics import daily_ic, realised_label, summarize_ic


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for day in pd.bdate_range("2021-03-01", periods=6):
        for k in range(12):
            mu = rng.normal()
            rows.append({"date": day, "instrument": f"SH60{k:04d}", "mu": mu, "label": 0.3 * mu + rng.normal()})
    frame = pd.DataFrame(rows)
    first, second = frame["date"].unique()[:2]
    frame.loc[frame.index[:3], "mu"] = 0.5  # ties inside a day
    frame.loc[frame.index[5], "label"] = np.nan  # a missing label drops that stock only
    # day 2 keeps a single usable stock: skipped; day 3 has a constant score: skipped
    frame.loc[(frame["date"] == second) & (frame["instrument"] != "SH600000"), "label"] = np.nan
    frame.loc[frame["date"] == frame["date"].unique()[2], "mu"] = 1.25
    return frame


def test_daily_ic_matches_scipy_and_skips_undefined_days():
    frame = _frame()
    daily = daily_ic(frame)
    assert list(daily.columns) == ["date", "ic", "rank_ic", "n"]
    assert len(daily) == 6
    for _, row in daily.iterrows():
        day = frame[(frame["date"] == row["date"])].dropna(subset=["mu", "label"])
        assert row["n"] == len(day)
        if len(day) < 2 or day["mu"].nunique() == 1:
            assert np.isnan(row["ic"]) and np.isnan(row["rank_ic"])
            continue
        assert row["ic"] == pytest.approx(stats.pearsonr(day["mu"], day["label"])[0], abs=1e-12)
        assert row["rank_ic"] == pytest.approx(stats.spearmanr(day["mu"], day["label"])[0], abs=1e-12)
    assert daily["ic"].isna().sum() == 2


def test_summary_uses_sample_std_like_qlib():
    daily = daily_ic(_frame())
    summary = summarize_ic(daily)
    valid = daily.dropna()
    assert summary["n_days"] == 4 and summary["n_skipped_days"] == 2
    assert summary["rank_ic"] == pytest.approx(valid["rank_ic"].mean())
    assert summary["rank_icir"] == pytest.approx(valid["rank_ic"].mean() / np.std(valid["rank_ic"].to_numpy(), ddof=1))
    assert summary["icir"] == pytest.approx(valid["ic"].mean() / np.std(valid["ic"].to_numpy(), ddof=1))


def test_daily_ic_requires_columns():
    with pytest.raises(DataError, match="label"):
        daily_ic(pd.DataFrame({"date": [], "instrument": [], "mu": []}))


def test_realised_label_is_close_t2_over_t1(market_helpers):
    long_bars, _, _ = market_helpers
    dates = pd.bdate_range("2021-01-04", periods=5)
    bars = long_bars(dates, {"SH600001": [10, 11, 12, 15, 18], "SH600002": [5, 5, 6, 6, 3]}, missing={("SH600002", 3)})
    label = realised_label(bars).set_index(["date", "instrument"])["label"]
    assert label[(dates[0], "SH600001")] == pytest.approx(12 / 11 - 1)
    assert label[(dates[2], "SH600001")] == pytest.approx(18 / 15 - 1)
    assert (dates[3], "SH600001") not in label.index  # t+2 is past the data
    # SH600002 has no bar on dates[3]: both labels that need it are unknown, as Qlib's Ref gives
    assert (dates[1], "SH600002") not in label.index and (dates[2], "SH600002") not in label.index
    assert label[(dates[0], "SH600002")] == pytest.approx(6 / 5 - 1)


def test_evaluate_command_with_label_column_and_with_bars(tmp_path, capsys, market_helpers, run_command):
    long_bars, _, _ = market_helpers
    dates = pd.bdate_range("2021-01-04", periods=8)
    rng = np.random.default_rng(3)
    closes = {f"SH60{k:04d}": list(10 * np.cumprod(1 + rng.normal(0, 0.02, len(dates)))) for k in range(6)}
    bars = long_bars(dates, closes)
    bars_path = tmp_path / "bars.parquet"
    bars.to_parquet(bars_path)
    labels = realised_label(bars)
    predictions = labels.assign(mu=labels["label"] + rng.normal(0, 0.01, len(labels)), sigma=1.0)
    with_label = tmp_path / "with_label.parquet"
    predictions.to_parquet(with_label)
    without_label = tmp_path / "without_label.parquet"
    predictions.drop(columns=["label"]).to_parquet(without_label)

    expected = summarize_ic(daily_ic(predictions))
    out_json = tmp_path / "ic.json"
    assert run_command(evaluate_command, ["evaluate", "--predictions", str(with_label), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert f"Rank IC: {expected['rank_ic']:.4f}" in printed
    assert json.loads(out_json.read_text())["summary"]["rank_icir"] == pytest.approx(expected["rank_icir"])

    assert run_command(evaluate_command, ["evaluate", "--predictions", str(without_label), "--bars", str(bars_path)]) == 0
    assert f"Rank ICIR: {expected['rank_icir']:.4f}" in capsys.readouterr().out

    with pytest.raises(DataError, match="--bars"):
        run_command(evaluate_command, ["evaluate", "--predictions", str(without_label)])


def test_evaluate_takes_labels_from_a_prepared_data_set(tmp_path, capsys, run_command):
    dates = pd.bdate_range("2021-01-04", periods=6)
    rng = np.random.default_rng(4)
    rows = pd.DataFrame(
        [{"date": d, "instrument": f"SZ00{k:04d}", "label": rng.normal()} for d in dates for k in range(8)]
    )
    dataset = tmp_path / "dataset"
    (dataset / "shards").mkdir(parents=True)
    # two shards; the second repeats the first's last day as halo (in_universe False) with a wrong label
    first = rows[rows["date"] <= dates[2]].assign(in_universe=True)
    halo = rows[rows["date"] == dates[2]].assign(in_universe=False, label=99.0)
    second = pd.concat([halo, rows[rows["date"] > dates[2]].assign(in_universe=True)])
    first.to_parquet(dataset / "shards" / "test-00000.parquet")
    second.to_parquet(dataset / "shards" / "test-00001.parquet")
    manifest = {"format_version": 1, "splits": {"test": []},
                "shards": [{"path": "shards/test-00000.parquet", "split": "test"}, {"path": "shards/test-00001.parquet", "split": "test"}]}
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    predictions = rows.assign(mu=rows["label"] * 0.5 + rng.normal(0, 1, len(rows)), sigma=1.0)
    path = tmp_path / "p.parquet"
    predictions.drop(columns=["label"]).to_parquet(path)

    expected = summarize_ic(daily_ic(predictions))
    assert run_command(evaluate_command, ["evaluate", "--predictions", str(path), "--labels-from", str(dataset)]) == 0
    printed = capsys.readouterr().out
    assert f"Rank IC: {expected['rank_ic']:.4f}" in printed and f"IC: {expected['ic']:.4f}" in printed


def test_evaluate_scores_only_each_days_index_members(tmp_path, capsys, run_command):
    """--membership: an all-A model scored for an index user. The members' rows score well and
    the others are noise, so the two answers differ; point in time, a stock counts only on its
    member days."""
    dates = pd.bdate_range("2021-01-04", periods=8)
    rng = np.random.default_rng(5)
    rows = []
    for day in dates:
        for k in range(20):
            label = rng.normal()
            member = k < 10 or (k == 10 and day >= dates[4])  # SH600010 joins on the fifth day
            rows.append({"date": day, "instrument": f"SH60{k:04d}", "label": label,
                         "mu": label + rng.normal(0, 0.3) if member else rng.normal()})
    predictions = pd.DataFrame(rows)
    path = tmp_path / "p.parquet"
    predictions.to_parquet(path)
    membership = tmp_path / "members.csv"
    pd.DataFrame({"instrument": [f"SH60{k:04d}" for k in range(11)] + ["SH999999"],
                  "start_date": ["2020-01-01"] * 10 + [str(dates[4].date()), "2020-01-01"],
                  "end_date": ["2030-12-31"] * 12}).to_csv(membership, index=False)

    members = predictions[(predictions["instrument"] < "SH600010")
                          | ((predictions["instrument"] == "SH600010") & (predictions["date"] >= dates[4]))]
    expected = summarize_ic(daily_ic(members))
    assert run_command(evaluate_command, ["evaluate", "--predictions", str(path), "--membership", str(membership)]) == 0
    printed = capsys.readouterr().out
    assert f"Rank IC: {expected['rank_ic']:.4f}" in printed and f"{len(members):,} stock-days" in printed
    assert expected["rank_ic"] > summarize_ic(daily_ic(predictions))["rank_ic"] + 0.2

    elsewhere = tmp_path / "elsewhere.csv"
    pd.DataFrame({"instrument": ["SZ000001"], "start_date": ["2020-01-01"], "end_date": ["2030-12-31"]}).to_csv(
        elsewhere, index=False)
    with pytest.raises(DataError, match="elsewhere.csv: no prediction row is a member"):
        run_command(evaluate_command, ["evaluate", "--predictions", str(path), "--membership", str(elsewhere)])
