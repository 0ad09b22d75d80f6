"""Real data: prepare a short CSI300 span, train briefly on 2 Ray workers, resume, predict every stock-day."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from fvae_dist.cli import main as cli_main
from fvae_dist.data.shards import iter_shard_days, load_manifest, shard_entries

pytestmark = [pytest.mark.ray, pytest.mark.real_data]

SMALL_MODEL = ["model.hidden_size=16", "model.num_factors=4", "model.num_portfolios=16"]


@pytest.mark.timeout(900)
def test_csi300_trains_resumes_and_predicts_every_stock_day(csi300_dir, ray_local, tmp_path):
    dataset = tmp_path / "csi300"
    assert cli_main([
        "prepare", "--source", str(csi300_dir / "stocks_daily.parquet"),
        "--membership", str(csi300_dir / "csi300_membership.csv"),
        "--train", "2016-01-01:2016-06-30", "--valid", "2016-07-01:2016-08-31", "--test", "2016-09-01:2016-10-31",
        "--out", str(dataset), "--no-progress",
    ]) == 0
    manifest = load_manifest(dataset)
    assert 250 <= manifest["splits"]["test"]["universe_size"]["mean"] <= 300  # CSI300 members with data

    common = [f"data.dataset_dir={dataset}", f"ray.storage_path={tmp_path / 'runs'}", "ray.run_name=csi300-smoke",
              "train.early_stopping_patience=0", *SMALL_MODEL]
    assert cli_main(["train", *common, "train.epochs=2"]) == 0
    run_dir = tmp_path / "runs" / "csi300-smoke"
    first = json.loads((run_dir / "metrics.json").read_text())
    assert first["epochs_completed"] == 2

    # the same run name again with more epochs continues from epoch 2 instead of starting over
    assert cli_main(["train", *common, "train.epochs=3"]) == 0
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][:2] == first["history"][:2]

    assert cli_main(["predict", "--run", str(run_dir), "--split", "test"]) == 0
    predictions = pd.read_parquet(run_dir / "predictions" / "test.parquet")
    expected = {
        (pd.Timestamp(sample.date), code)
        for entry in shard_entries(manifest, "test")
        for sample in iter_shard_days(dataset, entry, drop_nan_label=False)
        for code in sample.instruments
    }
    got = set(zip(pd.to_datetime(predictions["date"]), predictions["instrument"]))
    assert got == expected and len(predictions) == len(expected)
    assert predictions[["mu", "sigma"]].notna().all().all() and (predictions["sigma"] > 0).all()
