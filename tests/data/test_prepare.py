"""prepare: shards, manifest, windows, no look-ahead, atomic writes, no-op reruns."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fvae_dist.data import prepare as prepare_module
from fvae_dist.data import reopen
from fvae_dist.data.features import ALPHA158, ALPHA158_20, features_frame
from fvae_dist.data.prepare import prepare_dataset
from fvae_dist.data.processors import fit_robust_zscore
from fvae_dist.data.shards import collate_days, iter_shard_days, load_manifest, shard_entries
from fvae_dist.errors import ConfigError, DataError
from tests.data.frame_source import FrameSource, random_walk_bars

SEQ = 5


def _splits(calendar):
    return {
        "train": (calendar[10], calendar[99]),
        "valid": (calendar[100], calendar[129]),
        "test": (calendar[130], calendar[-1]),
    }


@pytest.fixture()
def bars():
    return random_walk_bars(n_stocks=30, n_days=160, seed=1)


def _prepare(source, out, **kw):
    kw.setdefault("splits", _splits(source.calendar))
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("shard_rows", 1_000)
    return prepare_dataset(source, out, progress=False, **kw)


def test_manifest_describes_the_data_set(tmp_path, bars):
    source = FrameSource(bars)
    result = _prepare(source, tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    assert not result.reused
    assert manifest["features"] == list(ALPHA158_20)
    assert manifest["seq_len"] == SEQ
    assert set(manifest["splits"]) == {"train", "valid", "test"}
    assert manifest["normalization"]["fit_end"] == str(source.calendar[99])
    assert all((tmp_path / "ds" / e["path"]).is_file() for e in manifest["shards"])
    assert len(shard_entries(manifest, "train")) > 1  # small shard_rows -> several shards
    # windows are cut when read: on disk only the halo is duplicated
    assert manifest["disk"]["rows_ratio"] < 1.5
    assert manifest["disk"]["bytes_ratio"] < 1.5
    train = manifest["splits"]["train"]
    assert train["n_days"] == 90 and train["universe_size"]["max"] <= 30


def test_windows_equal_the_normalised_raw_features(tmp_path, bars):
    source = FrameSource(bars)
    _prepare(source, tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    raw = features_frame(bars, calendar=source.calendar).set_index(["date", "instrument"]).sort_index()
    stats = manifest["normalization"]
    entry = shard_entries(manifest, "valid")[0]
    sample = next(iter_shard_days(tmp_path / "ds", entry, drop_nan_label=False))
    day_pos = int(np.searchsorted(source.calendar, sample.date))
    window_days = source.calendar[day_pos - SEQ + 1 : day_pos + 1]
    for n, code in enumerate(sample.instruments[:5]):
        for t, day in enumerate(window_days):
            key = (pd.Timestamp(day), code)
            for c, name in enumerate(manifest["features"]):
                value = raw.loc[key, name] if key in raw.index else np.nan
                expected = 0.0
                if np.isfinite(value):
                    expected = np.clip((value - stats["median"][name]) / stats["scale"][name], -3, 3)
                assert sample.x[n, t, c] == pytest.approx(expected, abs=1e-5), (code, str(day), name)
        assert sample.label[n] == pytest.approx(raw.loc[(pd.Timestamp(sample.date), code), "LABEL0"], nan_ok=True)


def test_days_samples_and_targets(tmp_path, bars):
    source = FrameSource(bars)
    _prepare(source, tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    days = [s for e in shard_entries(manifest, "train") for s in iter_shard_days(tmp_path / "ds", e, drop_nan_label=True)]
    dates = [s.date for s in days]
    assert len(dates) == len(set(dates))  # shards own disjoint days
    assert dates[0] == source.calendar[10]
    # label purge: the last two train days' labels reach into valid, so they are no samples
    assert source.calendar[99] not in dates and source.calendar[98] not in dates
    assert source.calendar[97] in dates
    for s in days:
        assert np.isfinite(s.y).all() and s.x.shape == (len(s.instruments), SEQ, 20)
        assert abs(float(np.mean(s.y))) < 0.2  # CSRankNorm: centred per day
    batch = collate_days(days[:3])
    assert batch["x"].shape[0] == 3 and batch["mask"].sum() == sum(len(s.instruments) for s in days[:3])


def test_normalisation_sees_only_the_training_span(tmp_path, bars):
    calendar = FrameSource(bars).calendar
    changed = bars.copy()
    later = changed["date"] > pd.Timestamp(calendar[99])
    for col in ("open", "high", "low", "close"):
        changed.loc[later, col] *= 3.0
    changed.loc[later, "volume"] *= 10.0
    a = _prepare(FrameSource(bars), tmp_path / "a").manifest["normalization"]
    b = _prepare(FrameSource(changed), tmp_path / "b").manifest["normalization"]
    for name in ALPHA158_20:
        assert a["median"][name] == pytest.approx(b["median"][name])
        assert a["scale"][name] == pytest.approx(b["scale"][name])


def test_the_158_features_are_prepared_and_fitted_a_few_columns_at_a_time(tmp_path, bars, monkeypatch):
    monkeypatch.setattr(prepare_module, "FIT_READ_BYTES", 1)          # one column per read
    source = FrameSource(bars)
    _prepare(source, tmp_path / "ds", feature_set="alpha158", chunk_size=7)
    manifest = load_manifest(tmp_path / "ds")
    assert manifest["feature_set"] == "alpha158" and manifest["features"] == list(ALPHA158)
    # the fit equals one over the training span's universe rows of the whole raw table
    raw = features_frame(bars, "alpha158", calendar=source.calendar)
    has_close = raw.merge(bars[["date", "instrument", "close"]], on=["date", "instrument"], how="left")["close"].notna()
    train = has_close.to_numpy() & raw["date"].between(pd.Timestamp(source.calendar[10]), pd.Timestamp(source.calendar[99]))
    expected = fit_robust_zscore({name: raw.loc[train, name].to_numpy() for name in ALPHA158})
    for name in ALPHA158:
        assert manifest["normalization"]["median"][name] == pytest.approx(expected.median[name], rel=1e-6), name
        assert manifest["normalization"]["scale"][name] == pytest.approx(expected.scale[name], rel=1e-6), name
    sample = next(iter_shard_days(tmp_path / "ds", shard_entries(manifest, "train")[0], drop_nan_label=True))
    assert sample.x.shape[1:] == (SEQ, 158)
    # a prepared 20-feature data set of the same source is another data set
    assert not _prepare(source, tmp_path / "ds").reused and load_manifest(tmp_path / "ds")["features"] == list(ALPHA158_20)


def test_the_feature_set_choices_are_listed(capsys):
    from fvae_dist.cli import main

    with pytest.raises(SystemExit):
        main(["prepare", "--source", "synthetic", "--out", "x", "--feature-set", "alpha360"])
    assert "choose from 'alpha158', 'alpha158_20'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["features", "--help"])
    assert "alpha158_20 (default)" in capsys.readouterr().out


def test_universe_follows_membership(tmp_path, bars):
    codes = sorted(bars["instrument"].unique())
    calendar = FrameSource(bars).calendar
    membership = pd.DataFrame(
        {
            "instrument": codes[:10],
            "start_date": calendar[0],
            "end_date": [calendar[120]] * 5 + [calendar[-1]] * 5,
        }
    )
    _prepare(FrameSource(bars, membership=membership), tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    for entry in shard_entries(manifest, "test"):
        for sample in iter_shard_days(tmp_path / "ds", entry, drop_nan_label=False):
            assert set(sample.instruments) <= set(codes[5:10])


def test_rerun_is_a_fast_noop_and_changed_settings_rebuild(tmp_path, bars):
    source = FrameSource(bars)
    _prepare(source, tmp_path / "ds")
    stamp = (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns
    again = _prepare(source, tmp_path / "ds")
    assert again.reused and (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns == stamp
    rebuilt = _prepare(source, tmp_path / "ds", seq_len=SEQ + 1)
    assert not rebuilt.reused and load_manifest(tmp_path / "ds")["seq_len"] == SEQ + 1


def test_a_crash_leaves_the_previous_data_set_whole(tmp_path, bars, monkeypatch):
    source = FrameSource(bars)
    _prepare(source, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds" / "shards").iterdir()}
    manifest_before = (tmp_path / "ds" / "manifest.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_module, "_write_shards", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _prepare(source, tmp_path / "ds", seq_len=SEQ + 2)
    assert (tmp_path / "ds" / "manifest.json").read_text() == manifest_before
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds" / "shards").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary leftovers


def test_a_crash_on_first_write_leaves_nothing_that_looks_complete(tmp_path, bars, monkeypatch):
    monkeypatch.setattr(prepare_module, "_fit_normalisation", lambda *a: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError):
        _prepare(FrameSource(bars), tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_name_the_setting(tmp_path, bars):
    source = FrameSource(bars)
    with pytest.raises(DataError, match="--valid"):
        _prepare(source, tmp_path / "ds", splits={**_splits(source.calendar), "valid": ("1990-01-01", "1990-02-01")})
    with pytest.raises(ConfigError, match="--train"):
        calendar = source.calendar
        _prepare(source, tmp_path / "ds", splits={**_splits(calendar), "train": (calendar[10], calendar[110])})
    with pytest.raises(ConfigError, match="seq-len"):
        _prepare(source, tmp_path / "ds", seq_len=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to overwrite"):
        _prepare(source, tmp_path / "other")


def test_shards_are_sorted_and_typed(tmp_path, bars):
    _prepare(FrameSource(bars), tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    for entry in manifest["shards"]:
        frame = pq.read_table(tmp_path / "ds" / entry["path"]).to_pandas()
        keys = list(zip(frame["date"], frame["instrument"]))
        assert keys == sorted(keys)
        assert (frame[manifest["features"]].dtypes == np.float32).all()
        assert frame[manifest["features"]].notna().all().all()
        assert frame[manifest["features"]].abs().max().max() <= 3.0
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["fingerprint"]


def test_excluded_stocks_leave_no_trace_in_the_training_target(tmp_path, bars):
    _prepare(FrameSource(bars), tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    entry = shard_entries(manifest, "train")[0]
    first = next(iter_shard_days(tmp_path / "ds", entry, drop_nan_label=True))
    held_out = set(first.instruments[:10])
    kept = next(iter_shard_days(tmp_path / "ds", entry, drop_nan_label=True, exclude_instruments=held_out))
    assert kept.date == first.date and not held_out & set(kept.instruments)
    # the target is the CSRankNorm among the remaining stocks only
    ranks = pd.Series(kept.label).rank(pct=True).to_numpy()
    np.testing.assert_allclose(kept.y, (ranks - 0.5) * 3.46, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- fit exclusion

def _held_out(bars, n=6):
    # every 5th stock lists late; take a mix so the excluded rows really move the statistics
    return sorted(bars["instrument"].unique())[:n]


def test_fit_without_some_stocks_equals_a_fit_on_a_source_without_them(tmp_path, bars):
    held = _held_out(bars)
    full = _prepare(FrameSource(bars), tmp_path / "full").manifest["normalization"]
    fitted = _prepare(FrameSource(bars), tmp_path / "excl", fit_exclude_instruments=held).manifest
    # features are per-stock time series, so dropping the stocks from the source changes no other row
    lacking = _prepare(FrameSource(bars[~bars["instrument"].isin(held)]), tmp_path / "lacking").manifest
    stats = fitted["normalization"]
    assert stats["median"] == lacking["normalization"]["median"]
    assert stats["scale"] == lacking["normalization"]["scale"]
    assert any(stats["median"][name] != full["median"][name] for name in ALPHA158_20)
    assert stats["fit_excluded_instruments"]["count"] == len(held)
    assert stats["fit_excluded_instruments"]["instruments"] == held
    assert fitted["settings"]["fit_exclude_instruments"]["sha256"] == stats["fit_excluded_instruments"]["sha256"]
    # the shards still hold the excluded stocks, normalised with the statistics fitted without them
    test_days = [s for e in shard_entries(fitted, "test") for s in iter_shard_days(tmp_path / "excl", e, drop_nan_label=False)]
    assert set(held) <= {code for s in test_days for code in s.instruments}
    raw = features_frame(bars, calendar=FrameSource(bars).calendar).set_index(["date", "instrument"])
    sample = test_days[0]
    row = list(sample.instruments).index(held[0])
    for c, name in enumerate(fitted["features"]):
        value = raw.loc[(pd.Timestamp(sample.date), held[0]), name]
        expected = np.clip((value - stats["median"][name]) / stats["scale"][name], -3, 3) if np.isfinite(value) else 0
        assert sample.x[row, -1, c] == pytest.approx(expected, abs=1e-5), name


def test_fit_exclusion_is_part_of_the_fingerprint(tmp_path, bars):
    source = FrameSource(bars)
    held = _held_out(bars)
    plain = _prepare(source, tmp_path / "plain").manifest["fingerprint"]
    first = _prepare(source, tmp_path / "ds", fit_exclude_instruments=held)
    assert not first.reused and first.manifest["fingerprint"] != plain
    stamp = (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns
    same = _prepare(source, tmp_path / "ds", fit_exclude_instruments=list(reversed(held)) + held[:1])
    assert same.reused and (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns == stamp
    other = _prepare(source, tmp_path / "ds", fit_exclude_instruments=held[1:])
    assert not other.reused and other.manifest["normalization"]["fit_excluded_instruments"]["count"] == len(held) - 1
    none = _prepare(source, tmp_path / "ds")
    assert not none.reused and none.manifest["fingerprint"] == plain
    with pytest.raises(ConfigError, match="NOPE"):
        _prepare(source, tmp_path / "ds", fit_exclude_instruments=["NOPE"])


def _long_table(bars, path):
    bars.sort_values(["instrument", "date"]).to_parquet(path, index=False)
    return path


def test_prepare_like_rebuilds_from_the_recorded_source(tmp_path, bars, monkeypatch):
    from fvae_dist.data.bars import open_source

    table = _long_table(bars, tmp_path / "bars.parquet")
    base = _prepare(open_source(str(table)), tmp_path / "base").manifest
    assert base["settings"]["source_open"] == {"spec": str(table.resolve()), "market": "all", "membership": None}
    held = _held_out(bars)
    like = reopen.prepare_like(tmp_path / "base", tmp_path / "like", fit_exclude_instruments=held)
    direct = _prepare(open_source(str(table)), tmp_path / "direct", fit_exclude_instruments=held)
    assert not like.reused and like.manifest["fingerprint"] == direct.manifest["fingerprint"]
    assert like.manifest["normalization"] == direct.manifest["normalization"]
    assert [e["n_rows"] for e in like.manifest["shards"]] == [e["n_rows"] for e in base["shards"]]

    # a rerun is a no-op that does not even open (scan) the source
    monkeypatch.setattr(reopen, "open_manifest_source", lambda *_: pytest.fail("source opened"))
    again = reopen.prepare_like(tmp_path / "base", tmp_path / "like", fit_exclude_instruments=held)
    assert again.reused
    monkeypatch.undo()

    table.rename(tmp_path / "moved.parquet")
    with pytest.raises(ConfigError, match=r"base/manifest.json.*bars.parquet no longer exists"):
        reopen.prepare_like(tmp_path / "base", tmp_path / "other", fit_exclude_instruments=held[:2])


def test_prepare_like_refuses_a_source_it_cannot_reopen_or_that_changed(tmp_path, bars):
    from fvae_dist.data.bars import open_source

    _prepare(FrameSource(bars), tmp_path / "frame")
    with pytest.raises(ConfigError, match=r"frame/manifest.json: records no way to reopen"):
        reopen.prepare_like(tmp_path / "frame", tmp_path / "out", fit_exclude_instruments=["SH600000"])
    table = _long_table(bars, tmp_path / "bars.parquet")
    _prepare(open_source(str(table)), tmp_path / "base")
    changed = bars.copy()
    changed["volume"] *= 2.0
    _long_table(changed, table)
    with pytest.raises(ConfigError, match="changed since the data set was prepared"):
        reopen.prepare_like(tmp_path / "base", tmp_path / "out", fit_exclude_instruments=["SH600000"])


def test_synthetic_and_membership_sources_reopen_with_the_same_fingerprint(tmp_path, bars):
    from fvae_dist.data.bars import open_source

    for source in (open_source("synthetic:stocks=7,days=50,seed=3"),):
        args = source.open_args()
        assert open_source(**args).fingerprint() == source.fingerprint()
    table = _long_table(bars, tmp_path / "bars.parquet")
    codes = sorted(bars["instrument"].unique())
    pd.DataFrame({"instrument": codes[:10], "start_date": "2020-01-01", "end_date": "2030-01-01"}).to_csv(
        tmp_path / "demo_membership.csv", index=False)
    for source in (open_source(str(table), market="demo"),
                   open_source(str(table), membership=str(tmp_path / "demo_membership.csv"))):
        args = source.open_args()
        reopened = open_source(**args)
        assert reopened.fingerprint() == source.fingerprint() and reopened.instruments == codes[:10]


def test_full_window_universe_keeps_only_stocks_traded_on_every_window_day(tmp_path, bars):
    """--universe full-window (eq. 2): a day's samples are the stocks with a close and volume > 0
    on all T days of the window; padded (the default) keeps every stock with a bar that day."""
    source = FrameSource(bars)
    _prepare(source, tmp_path / "padded")
    _prepare(source, tmp_path / "full", universe="full-window")
    calendar = np.asarray(source.calendar, dtype="datetime64[D]")
    traded = bars.assign(date=bars["date"].to_numpy(dtype="datetime64[D]"))
    traded = set(map(tuple, traded.loc[traded["volume"] > 0, ["date", "instrument"]].to_numpy()))
    full_manifest, padded_manifest = load_manifest(tmp_path / "full"), load_manifest(tmp_path / "padded")
    assert full_manifest["universe_rule"] == "full-window" and padded_manifest["universe_rule"] == "padded"
    assert full_manifest["fingerprint"] != padded_manifest["fingerprint"]
    n_full = n_padded = 0
    for split in ("train", "valid", "test"):
        for entry in shard_entries(full_manifest, split):
            for day in iter_shard_days(tmp_path / "full", entry, drop_nan_label=False):
                t = int(np.searchsorted(calendar, day.date))
                window = calendar[t - SEQ + 1 : t + 1]
                for code in day.instruments:
                    assert all((d, code) in traded for d in window), (day.date, code)
                n_full += len(day.instruments)
        n_padded += sum(len(d.instruments) for e in shard_entries(padded_manifest, split)
                        for d in iter_shard_days(tmp_path / "padded", e, drop_nan_label=False))
    # late listings and suspensions (random_walk_bars has both) leave the full-window universe smaller
    assert 0.7 * n_padded < n_full < n_padded


def test_an_unknown_universe_rule_is_refused(tmp_path, bars):
    with pytest.raises(ConfigError, match="--universe 'all': expected one of padded, full-window"):
        _prepare(FrameSource(bars), tmp_path / "ds", universe="all")
