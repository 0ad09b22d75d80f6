"""Qlib binary directory reader, checked by round trips through the fixture writer."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fvae_dist.data.bars import open_source
from fvae_dist.data.qlib_bin import QlibBinSource, write_qlib_dir
from fvae_dist.data.synthetic import generate_market
from fvae_dist.errors import DataError

PRICES = ["open", "high", "low", "close", "volume", "factor"]


@pytest.fixture(scope="module")
def bars() -> pd.DataFrame:
    market = generate_market(12, 60, seed=7)
    bars = market.bars()
    # the fixture must exercise late listings, delistings and suspended days (gaps inside a span)
    assert (market.membership["start_date"] > bars["date"].min()).any()
    assert (market.membership["end_date"] < bars["date"].max()).any()
    assert len(bars) < sum(len(pd.bdate_range(a, b)) for a, b in zip(market.membership["start_date"], market.membership["end_date"]))
    return bars


def as_float32(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({c: np.float32 for c in PRICES}).astype({c: np.float64 for c in PRICES})


def test_round_trip(tmp_path, bars):
    write_qlib_dir(bars, tmp_path / "qlib")
    source = open_source(str(tmp_path / "qlib"))
    assert isinstance(source, QlibBinSource)
    assert source.name == f"qlib:{(tmp_path / 'qlib').resolve()}[all]"
    assert (tmp_path / "qlib" / "features" / "syn00000" / "close.day.bin").is_file()  # codes lowercase on disk
    assert source.instruments == sorted(bars["instrument"].unique())  # ... and as given in instruments/
    np.testing.assert_array_equal(source.calendar, np.unique(bars["date"].to_numpy("datetime64[D]")))
    got = pd.concat(list(source.iter_chunks(instruments_per_chunk=5)), ignore_index=True)
    # suspended days are NaN in the bins and must not come back as rows
    pd.testing.assert_frame_equal(got, as_float32(bars), check_dtype=False)


def test_window_missing_factor_and_nan_close(tmp_path, bars):
    without_factor = bars.drop(columns="factor")
    without_factor.loc[4, "close"] = np.nan
    write_qlib_dir(without_factor, tmp_path / "qlib")
    source = open_source(str(tmp_path / "qlib"))
    days = source.calendar
    got = pd.concat(list(source.iter_chunks(start=days[10], end=days[20])), ignore_index=True)
    assert (got["factor"] == 1.0).all()
    assert set(got["date"].to_numpy("datetime64[D]")) <= set(days[10:21])
    expected = without_factor[without_factor["close"].notna()]
    expected = expected[(expected["date"] >= pd.Timestamp(days[10])) & (expected["date"] <= pd.Timestamp(days[20]))]
    assert len(got) == len(expected)
    with pytest.raises(DataError, match="no trading days between start=2031-01-01"):
        list(source.iter_chunks(start="2031-01-01"))


def test_market_file_gives_instruments_and_membership(tmp_path, bars):
    days = np.unique(bars["date"].to_numpy("datetime64[D]"))
    membership = pd.DataFrame(
        {
            "instrument": ["SYN00001", "SYN00001", "SYN00004"],
            "start_date": [days[0], days[30], days[5]],
            "end_date": [days[9], days[40], days[-1]],
        }
    )
    write_qlib_dir(bars, tmp_path / "qlib", market="idx", membership=membership)
    source = open_source(str(tmp_path / "qlib"), market="idx")
    assert source.instruments == ["SYN00001", "SYN00004"]
    assert len(source.membership) == 3
    np.testing.assert_array_equal(source.membership["end_date"].to_numpy("datetime64[D]"), membership["end_date"].to_numpy("datetime64[D]"))
    assert set(pd.concat(list(source.iter_chunks()))["instrument"]) == {"SYN00001", "SYN00004"}


def test_directory_errors(tmp_path, bars):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a Qlib data directory, calendars/day.txt is missing"):
        open_source(str(tmp_path / "plain"))
    root = write_qlib_dir(bars, tmp_path / "qlib", market="csi300")
    with pytest.raises(DataError, match=r"market 'csi500' not found .* available markets: all, csi300"):
        open_source(str(root), market="csi500")


def test_missing_and_truncated_bins(tmp_path, bars):
    root = write_qlib_dir(bars, tmp_path / "qlib")
    volume = root / "features" / "syn00003" / "volume.day.bin"
    content = volume.read_bytes()
    volume.unlink()
    with pytest.raises(DataError, match=r"instrument SYN00003 has no features/syn00003/volume.day.bin"):
        open_source(str(root))
    volume.write_bytes(content[:-2])
    with pytest.raises(DataError, match=r"volume.day.bin: truncated bin file"):
        open_source(str(root))
    volume.write_bytes(content)
    calendar = root / "calendars" / "day.txt"
    calendar.write_text("".join(calendar.read_text().splitlines(keepends=True)[:-5]))
    source = open_source(str(root))
    with pytest.raises(DataError, match=r"past the 55 days of calendars/day.txt"):
        list(source.iter_chunks())


def test_fingerprint_follows_the_bins(tmp_path, bars):
    root = write_qlib_dir(bars, tmp_path / "qlib")
    first = open_source(str(root)).fingerprint()
    assert first == open_source(str(root)).fingerprint()
    close = root / "features" / "syn00002" / "close.day.bin"
    values = np.fromfile(close, dtype="<f4")
    values[-1] *= 1.01
    values.tofile(close)
    assert open_source(str(root)).fingerprint() != first


def test_a_vwap_bin_reaches_the_features(tmp_path, bars):
    from fvae_dist.data.features import features_frame

    with_vwap = bars.assign(vwap=bars["close"] * 1.01)
    root = write_qlib_dir(with_vwap, tmp_path / "qlib")
    assert any(root.glob("features/*/vwap.day.bin"))
    source = QlibBinSource(root)
    chunk = pd.concat(source.iter_chunks())
    assert "vwap" in chunk.columns
    np.testing.assert_allclose(features_frame(chunk, "alpha158")["VWAP0"].dropna(), 1.01, rtol=1e-6)
    assert "vwap" not in pd.concat(QlibBinSource(write_qlib_dir(bars, tmp_path / "plain")).iter_chunks()).columns
