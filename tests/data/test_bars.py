"""Long-table reader (Parquet/CSV), membership files and open_source dispatch."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fvae_dist.data.bars import BarSource, open_source, read_membership
from fvae_dist.data.long_table import LongTableSource
from fvae_dist.errors import ConfigError, DataError

OUTPUT = ["date", "instrument", "open", "high", "low", "close", "volume", "factor"]


def tiny_bars(n_stocks: int = 4, n_days: int = 6, seed: int = 0) -> pd.DataFrame:
    """Instrument-major bars with distinct values, so a misplaced row shows up in a comparison."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-03-01", periods=n_days)
    rows = []
    for s in range(n_stocks):
        close = 10 + s + rng.random(n_days)
        rows.append(
            pd.DataFrame(
                {
                    "date": dates,
                    "instrument": f"SH60000{s}",
                    "open": close * 0.99,
                    "high": close * 1.02,
                    "low": close * 0.97,
                    "close": close,
                    "volume": rng.integers(1_000, 9_000, n_days).astype(float),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def write(frame: pd.DataFrame, path):
    if str(path).endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def all_rows(source, **kw) -> pd.DataFrame:
    return pd.concat(list(source.iter_chunks(**kw)), ignore_index=True)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_long_table_round_trip(tmp_path, suffix):
    bars = tiny_bars()
    source = open_source(str(write(bars, tmp_path / f"bars{suffix}")))
    assert isinstance(source, BarSource)
    assert source.name.startswith("long_table:")
    assert source.instruments == sorted(bars["instrument"].unique())
    assert source.calendar.dtype == np.dtype("datetime64[D]")
    np.testing.assert_array_equal(source.calendar, np.unique(bars["date"].to_numpy("datetime64[D]")))
    assert source.membership is None
    got = all_rows(source, instruments_per_chunk=3)
    assert list(got.columns) == OUTPUT
    assert (got["factor"] == 1.0).all()  # no factor column -> 1.0
    pd.testing.assert_frame_equal(
        got.drop(columns="factor"), bars.astype({"date": "datetime64[ns]"}), check_dtype=False, rtol=1e-12
    )


def test_chunks_hold_complete_histories_of_a_date_major_file(tmp_path):
    bars = tiny_bars(n_stocks=5, n_days=8).sort_values(["date", "instrument"])  # date-major also passes
    bars["factor"] = 2.0
    bars["change"] = 0.1  # extra columns are ignored
    source = open_source(str(write(bars, tmp_path / "bars.parquet")))
    chunks = list(source.iter_chunks(instruments_per_chunk=2))
    assert [c["instrument"].nunique() for c in chunks] == [2, 2, 1]
    for chunk in chunks:
        assert (chunk.groupby("instrument").size() == 8).all()
        assert chunk.equals(chunk.sort_values(["instrument", "date"]).reset_index(drop=True))
        assert (chunk["factor"] == 2.0).all()
    assert sum(len(c) for c in chunks) == len(bars)


def test_start_end_window_and_nan_bars(tmp_path):
    bars = tiny_bars()
    bars.loc[3, ["open", "high", "low", "close"]] = np.nan  # NaN price = missing bar, allowed
    source = open_source(str(write(bars, tmp_path / "bars.parquet")))
    days = source.calendar
    got = all_rows(source, start=str(days[1]), end=days[3])
    assert set(got["date"].to_numpy("datetime64[D]")) == set(days[1:4])
    assert got["close"].isna().sum() == 1
    with pytest.raises(DataError, match="no trading days between start=2030-01-01"):
        list(source.iter_chunks(start="2030-01-01"))
    with pytest.raises(DataError, match="no trading days"):
        list(source.iter_chunks(start=days[3], end=days[2]))


@pytest.mark.parametrize(
    "rename, expected",
    [({"clsoe": "close"}, 'did you mean "clsoe"'), ({"Volume": "volume"}, 'did you mean "Volume"'), ({"when": "date"}, '"date" is missing')],
)
def test_missing_or_misspelt_column(tmp_path, rename, expected):
    bars = tiny_bars().rename(columns={v: k for k, v in rename.items()})
    for suffix in (".parquet", ".csv"):
        path = write(bars, tmp_path / f"bars{suffix}")
        with pytest.raises(DataError, match=expected) as error:
            open_source(str(path))
        assert str(path) in str(error.value)


def test_non_numeric_price_in_csv_names_row_and_value(tmp_path):
    bars = tiny_bars().astype({"close": object})
    bars.loc[7, "close"] = "12,5x"
    path = write(bars, tmp_path / "bars.csv")
    with pytest.raises(DataError, match=r"column 'close', row 8 \(line 9\): '12,5x' is not a number"):
        open_source(str(path))


def test_non_numeric_type_in_parquet(tmp_path):
    bars = tiny_bars()
    bars["volume"] = bars["volume"].astype(str)
    bars.loc[2, "volume"] = "lots"
    with pytest.raises(DataError, match=r"column 'volume', row 3: 'lots' is not a number"):
        open_source(str(write(bars, tmp_path / "bars.parquet")))
    bars["volume"] = True
    with pytest.raises(DataError, match=r"column 'volume' has type bool"):
        open_source(str(write(bars, tmp_path / "bars2.parquet")))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_duplicate_rows(tmp_path, suffix):
    bars = tiny_bars()
    bars = pd.concat([bars.iloc[:4], bars.iloc[3:4], bars.iloc[4:]], ignore_index=True)
    with pytest.raises(DataError, match=r"duplicate \(date, instrument\) row: row 5.*SH600000 on 2021-03-04.*row 4"):
        open_source(str(write(bars, tmp_path / f"bars{suffix}")))


def test_unsorted_rows(tmp_path):
    bars = tiny_bars()
    bars.iloc[[1, 2]] = bars.iloc[[2, 1]].to_numpy()
    with pytest.raises(DataError, match=r"not sorted: row 3 has SH600000 on 2021-03-02 after 2021-03-03 at row 2"):
        open_source(str(write(bars, tmp_path / "bars.parquet")))


def test_order_is_checked_across_batches_and_row_groups(tmp_path):
    bars = tiny_bars(n_stocks=3, n_days=5)
    late = bars.iloc[[0]].copy()  # SH600000's first day again, in the last row group
    table = pa.Table.from_pandas(pd.concat([bars, late], ignore_index=True), preserve_index=False)
    pq.write_table(table, tmp_path / "bars.parquet", row_group_size=4)
    with pytest.raises(DataError, match=r"duplicate.*row 16 repeats SH600000 on 2021-03-01 from row 1"):
        open_source(str(tmp_path / "bars.parquet"))
    # a repeat far from its twin is still called a duplicate, not merely "unsorted"
    write(table.to_pandas(), tmp_path / "bars.csv")
    with pytest.raises(DataError, match=r"duplicate.*row 16 \(line 17\) repeats SH600000 on 2021-03-01 from row 1 \(line 2\)"):
        open_source(str(tmp_path / "bars.csv"))


@pytest.mark.parametrize("column, value", [("close", 0.0), ("low", -1.5), ("open", np.inf), ("volume", -10.0)])
def test_impossible_values(tmp_path, column, value):
    bars = tiny_bars()
    bars.loc[9, column] = value
    with pytest.raises(DataError, match=rf"column '{column}', row 10 \(SH600001, 2021-03-04\)"):
        open_source(str(write(bars, tmp_path / "bars.parquet")))


def test_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        open_source(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("date,instrument,open,high,low,close,volume\n")
    with pytest.raises(DataError, match="no rows"):
        open_source(str(tmp_path / "header.csv"))
    with pytest.raises(DataError, match="no rows"):
        open_source(str(write(tiny_bars().iloc[:0], tmp_path / "empty.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        open_source(str(tmp_path / "junk.parquet"))


def test_bad_dates(tmp_path):
    bars = tiny_bars().astype({"date": str})
    bars.loc[5, "date"] = "yesterday"
    with pytest.raises(DataError, match=r"column 'date', row 6 \(line 7\): 'yesterday' is not a date"):
        open_source(str(write(bars, tmp_path / "bars.csv")))


def test_membership_restricts_instruments(tmp_path):
    bars = tiny_bars()
    table = write(bars, tmp_path / "bars.parquet")
    (tmp_path / "idx_membership.csv").write_text(
        "instrument,start_date,end_date\nSH600001,2021-03-01,2021-03-03\nSH600001,2021-03-05,2021-03-08\n"
        "SH600003,2021-03-01,2021-03-08\nSZ000001,2021-03-01,2021-03-08\n"
    )
    source = open_source(str(table), market="idx")  # <market>_membership.csv beside the table
    assert source.instruments == ["SH600001", "SH600003"]
    assert len(source.membership) == 4
    assert source.membership["start_date"].dtype == np.dtype("datetime64[ns]")
    assert set(all_rows(source)["instrument"]) == {"SH600001", "SH600003"}
    with pytest.raises(ConfigError, match="--market csi300"):
        open_source(str(table), market="csi300")
    (tmp_path / "other.csv").write_text("instrument,start_date,end_date\n600001,2021-03-01,2021-03-08\n")
    with pytest.raises(DataError, match="none of its 1 instruments"):
        open_source(str(table), membership=tmp_path / "other.csv")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("instrument,start,end_date\nA,2020-01-01,2020-02-01\n", '"start_date" is missing \\(did you mean "start"\\?\\)'),
        ("instrument,start_date,end_date\nA,2020-01-01,2020-13-45\n", r"'end_date', row 1: '2020-13-45' is not a date"),
        ("instrument,start_date,end_date\nA,2020-03-01,2020-02-01\n", r"row 1 \(A\): end_date 2020-02-01 is before"),
        ("instrument,start_date,end_date\n", "no rows"),
        ("", "empty"),
    ],
)
def test_bad_membership_files(tmp_path, text, expected):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(DataError, match=expected) as error:
        read_membership(tmp_path / "m.csv")
    assert "m.csv" in str(error.value)


def test_fingerprint_follows_content(tmp_path):
    bars = tiny_bars()
    path = write(bars, tmp_path / "bars.parquet")
    first = open_source(str(path)).fingerprint()
    assert first == open_source(str(path)).fingerprint()
    bars.loc[0, "close"] += 1
    write(bars, path)
    assert open_source(str(path)).fingerprint() != first


def test_open_source_rejects_unknown_specs(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        open_source(str(tmp_path / "nothing"))
    (tmp_path / "bars.xlsx").write_text("x")
    with pytest.raises(ConfigError, match="unknown file type '.xlsx'"):
        open_source(str(tmp_path / "bars.xlsx"))
    with pytest.raises(ConfigError, match="instruments_per_chunk=0"):
        list(open_source(str(write(tiny_bars(), tmp_path / "b.parquet"))).iter_chunks(0))


@pytest.mark.real_data
def test_real_csi300_long_table(csi300_dir):
    path = csi300_dir / "stocks_daily.parquet"
    began = time.perf_counter()
    source = open_source(str(path), membership=csi300_dir / "csi300_membership.csv")
    opened_s = time.perf_counter() - began
    assert isinstance(source, LongTableSource)
    metadata = pq.ParquetFile(path).metadata
    assert source.n_rows == metadata.num_rows
    table = pq.read_table(path, columns=["date"])
    assert len(source.calendar) == len(pc.unique(table["date"]))
    dataset = ds.dataset(path)
    window = (ds.field("date") >= pd.Timestamp("2015-01-01")) & (ds.field("date") <= pd.Timestamp("2016-12-31"))
    chunks = source.iter_chunks(instruments_per_chunk=40, start="2015-01-01", end="2016-12-31")
    for _, chunk in zip(range(2), chunks):
        codes = list(chunk["instrument"].unique())
        expected_rows = dataset.count_rows(filter=window & ds.field("instrument").isin(codes))
        assert len(chunk) == expected_rows > 0
        assert 0 < chunk["instrument"].nunique() <= 40  # a member may have no bars in the window
        assert chunk["date"].is_monotonic_increasing or chunk.groupby("instrument")["date"].is_monotonic_increasing.all()
    print(f"opened and validated {metadata.num_rows:,} rows in {opened_s:.2f}s")
