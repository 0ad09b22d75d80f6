"""Raw daily bars: the `BarSource` protocol, the long-table (Parquet/CSV) reader and membership files.

Every source hands out the same long frames, a few hundred instruments at a time:

    date (datetime64[ns]), instrument (str), open, high, low, close, volume, factor (float64)
    [, vwap, amount]  (float64, only when the source has them: VWAP0's input, see `bar_vwap`)

sorted by (instrument, date), each chunk holding the complete history (within [start, end]) of its
instruments, so feature code never has to stitch an instrument together across chunks. `factor` is 1.0
when the source has none. A NaN close means "no bar that day".

Readers for the other layouts live beside this one: `qlib_bin.py` (Qlib binary directories) and
`synthetic.py` (the factor-model generator). `open_source` picks one from a spec string.
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fvae_dist.errors import ConfigError, DataError, nearest_name

PRICE_COLUMNS = ("open", "high", "low", "close")
BAR_COLUMNS = (*PRICE_COLUMNS, "volume")
REQUIRED_COLUMNS = ("date", "instrument", *BAR_COLUMNS)
OUTPUT_COLUMNS = ("date", "instrument", *BAR_COLUMNS, "factor")
# read when present: the volume-weighted average price (as given, or from the traded amount)
OPTIONAL_COLUMNS = ("vwap", "amount")
MEMBERSHIP_COLUMNS = ("instrument", "start_date", "end_date")

# Up to this many bytes of input are hashed by content; above it, path + size + mtime stand in
# (hashing runs at several hundred MB/s, so this keeps a fingerprint well under a second or two).
CONTENT_HASH_LIMIT_BYTES = 512 * 1024**2
_BATCH_ROWS = 1 << 16
_CSV_NULLS = ["", "NA", "N/A", "NaN", "nan", "NULL", "null", "None", "-"]


@runtime_checkable
class BarSource(Protocol):
    """What every reader offers; see the module docstring for the chunk layout."""

    name: str
    calendar: np.ndarray  # datetime64[D], sorted unique trading days
    instruments: list[str]
    membership: pd.DataFrame | None  # instrument, start_date, end_date, or None (every stock always a member)

    def iter_chunks(self, instruments_per_chunk: int = 256, start=None, end=None) -> Iterator[pd.DataFrame]: ...

    def fingerprint(self) -> str: ...

    def open_args(self) -> dict | None:
        """The open_source(spec, market=, membership=) arguments that reopen this source (so a
        prepared data set can be rebuilt from its manifest), or None when no spec can."""
        ...


# --------------------------------------------------------------------------------------------------
# helpers shared by the readers


def close_match_hint(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean "close"?)' when a near spelling exists, else ''."""
    match = nearest_name(name, candidates)
    return f' (did you mean "{match}"?)' if match else ""


def check_columns(found: list[str], required: Iterable[str], where: str) -> None:
    """Raise a DataError naming every required column that is missing, with a spelling hint each."""
    missing = [c for c in required if c not in found]
    if not missing:
        return
    extra = [c for c in found if c not in required]
    hints = "; ".join(f'"{c}" is missing{close_match_hint(c, extra)}' for c in missing)
    raise DataError(f"{where}: {hints}. Expected columns {', '.join(required)}; found {', '.join(found) or 'none'}")


def to_day(value, setting: str) -> np.datetime64:
    """A date-like setting (str, datetime, Timestamp, datetime64) as datetime64[D]."""
    try:
        day = np.datetime64(pd.Timestamp(value).date(), "D")
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{setting}={value!r}: expected a date like 2020-01-31 ({error})") from None
    return day


def calendar_window(calendar: np.ndarray, start, end, source_name: str) -> tuple[np.datetime64, np.datetime64]:
    """[start, end] as days, checked to hold at least one trading day of `calendar`."""
    lo = calendar[0] if start is None else to_day(start, "start")
    hi = calendar[-1] if end is None else to_day(end, "end")
    first = int(np.searchsorted(calendar, lo, side="left"))
    if first >= len(calendar) or calendar[first] > hi:
        raise DataError(
            f"{source_name}: no trading days between start={lo} and end={hi}; "
            f"the calendar covers {calendar[0]}..{calendar[-1]} ({len(calendar)} days)"
        )
    return lo, hi


def bars_frame(days: np.ndarray, instruments: np.ndarray, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """The chunk layout every reader returns (column order, dtypes)."""
    frame = pd.DataFrame(
        {"date": days.astype("datetime64[D]").astype("datetime64[ns]"), "instrument": instruments.astype(object)}
    )
    n = len(days)
    for name in (*BAR_COLUMNS, "factor"):
        column = values.get(name)
        frame[name] = np.ones(n) if column is None else np.asarray(column, dtype=np.float64)
    for name in OPTIONAL_COLUMNS:
        if name in values:
            frame[name] = np.asarray(values[name], dtype=np.float64)
    return frame


def bar_vwap(bars: pd.DataFrame) -> np.ndarray | None:
    """Each bar's volume-weighted average price on the scale of the price columns: Qlib's $vwap.

    Qlib's convention (its data collectors): prices, vwap included, are back-adjusted (raw price x
    factor); the traded amount is the raw value in currency. So a `vwap` column is taken as it is (it
    must be adjusted like open/high/low/close), and without one vwap = amount / volume * factor, from
    `amount` and the raw share volume (amount / volume is the raw vwap). NaN on a day with volume 0 (a
    suspension trades nothing). None when the bars have neither column: VWAP0 is then NaN, as Qlib's.
    """
    if "vwap" in bars.columns:
        column = "vwap"
        vwap = pd.to_numeric(bars["vwap"], errors="raise").to_numpy(dtype=np.float64)
    elif "amount" in bars.columns:
        column = "amount"
        amount = pd.to_numeric(bars["amount"], errors="raise").to_numpy(dtype=np.float64)
        volume = pd.to_numeric(bars["volume"], errors="raise").to_numpy(dtype=np.float64)
        factor = bars["factor"].to_numpy(dtype=np.float64) if "factor" in bars.columns else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            vwap = np.where(volume > 0, amount / volume * factor, np.nan)
    else:
        return None
    _check_vwap_scale(vwap, bars, column)
    return vwap


def _check_vwap_scale(vwap: np.ndarray, bars: pd.DataFrame, column: str) -> None:
    """A vwap lies between the day's low and high: far from the close on a typical day, the units are off."""
    ratio = vwap / bars["close"].to_numpy(dtype=np.float64)
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return
    typical = float(np.median(ratio))
    if not 0.5 <= typical <= 2.0:
        hint = ("expected vwap on the scale of the adjusted prices" if column == "vwap" else
                "expected amount as the traded value in currency and volume in shares (not lots), "
                "so that amount / volume * factor is the adjusted vwap")
        raise DataError(f"bars column {column!r}: the vwap it gives is {typical:.3g}x the close on a typical day; "
                        f"{hint}")


def fingerprint_files(paths: list[Path], extra: str = "") -> str:
    """Hash of the files' content, or of path/size/mtime when they are too big to hash cheaply."""
    digest = hashlib.sha256(extra.encode())
    stats = [(Path(p), os.stat(p)) for p in paths]
    by_content = sum(s.st_size for _, s in stats) <= CONTENT_HASH_LIMIT_BYTES
    digest.update(b"content" if by_content else b"stat")
    for path, stat in stats:
        digest.update(f"\0{path.name}\0{stat.st_size}".encode())
        if by_content:
            with open(path, "rb") as handle:
                while block := handle.read(8 << 20):
                    digest.update(block)
        else:
            digest.update(f"\0{path.resolve()}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def chunked(items: list, size: int, setting: str = "instruments_per_chunk") -> Iterator[list]:
    if int(size) < 1:
        raise ConfigError(f"{setting}={size}: expected a positive number of instruments per chunk")
    for i in range(0, len(items), int(size)):
        yield items[i : i + int(size)]


# --------------------------------------------------------------------------------------------------
# membership


def read_membership(path) -> pd.DataFrame:
    """Point-in-time universe from CSV/Parquet: instrument, start_date, end_date (inclusive).

    Returns those three columns (dates as datetime64[ns], one row per interval) sorted by instrument
    and start_date. An instrument may have several intervals (it can leave and re-enter an index).
    """
    path = Path(path)
    where = f"membership file {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file (expected a CSV or Parquet with columns {', '.join(MEMBERSHIP_COLUMNS)})")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_csv(path, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: the file is empty (expected a header {','.join(MEMBERSHIP_COLUMNS)} and rows)") from None
    except (ValueError, OSError, pa.ArrowException) as error:
        raise DataError(f"{where}: cannot be read as {'Parquet' if path.suffix == '.parquet' else 'CSV'} ({error})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    check_columns(list(raw.columns), MEMBERSHIP_COLUMNS, where)
    if raw.empty:
        raise DataError(f"{where}: no rows (expected one row per membership interval)")
    instrument = raw["instrument"].astype(object)
    blank = instrument.isna() | (instrument.astype(str).str.strip() == "")
    if blank.any():
        raise DataError(f"{where}: row {int(np.flatnonzero(blank.to_numpy())[0]) + 1}: empty instrument")
    dates = {name: _parse_membership_dates(raw[name], name, where) for name in ("start_date", "end_date")}
    reversed_rows = np.flatnonzero(dates["end_date"] < dates["start_date"])
    if len(reversed_rows):
        row = int(reversed_rows[0])
        raise DataError(
            f"{where}: row {row + 1} ({instrument.iloc[row]}): end_date {dates['end_date'][row]} is before "
            f"start_date {dates['start_date'][row]} (expected start_date <= end_date)"
        )
    frame = pd.DataFrame(
        {
            "instrument": instrument.astype(str).str.strip().to_numpy(dtype=object),
            "start_date": dates["start_date"].astype("datetime64[ns]"),
            "end_date": dates["end_date"].astype("datetime64[ns]"),
        }
    )
    return frame.sort_values(["instrument", "start_date"], kind="stable").reset_index(drop=True)


def _parse_membership_dates(column: pd.Series, name: str, where: str) -> np.ndarray:
    parsed = pd.to_datetime(column, errors="coerce", format="mixed")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where}: column {name!r}, row {row + 1}: {column.iloc[row]!r} is not a date "
            f"(expected a date like 2020-01-31 in every row)"
        )
    return parsed.to_numpy().astype("datetime64[D]")


# --------------------------------------------------------------------------------------------------
# long table


class LongTableSource:
    """A Parquet or CSV long table: one row per (date, instrument), validated in one streaming pass.

    The pass checks columns, types, prices, duplicates and ordering, and records the calendar, the
    instruments and which Parquet row groups hold each instrument; chunks are then read row group by
    row group and filtered, so memory holds one batch plus the chunk being built, never the table.
    A CSV is converted to a temporary Parquet file during the same pass.
    """

    def __init__(self, path, *, market: str = "all", membership=None):
        self.path = Path(path).resolve()
        self.market = market
        self.name = f"long_table:{self.path}" + ("" if market == "all" else f"[{market}]")
        self._membership_path = _membership_path_for(self.path, market, membership)
        self.membership = None if self._membership_path is None else read_membership(self._membership_path)
        self._is_csv = self.path.suffix.lower() != ".parquet" and ".csv" in self.path.suffixes
        self._parquet_path = self.path
        self._fingerprint: str | None = None
        if self._is_csv:
            self._tmpdir = tempfile.mkdtemp(prefix="fvae_long_table_")
            weakref.finalize(self, shutil.rmtree, self._tmpdir, ignore_errors=True)
            self._parquet_path = Path(self._tmpdir) / "table.parquet"
        scan = _TableScan(self.path, csv_copy_to=self._parquet_path if self._is_csv else None)
        self._has_factor = scan.has_factor
        self._optional = scan.optional
        self._ids = scan.ids
        self._row_group_ids = scan.row_group_ids
        self._row_group_days = scan.row_group_days
        self.n_rows = scan.n_rows
        self.calendar = scan.calendar
        names = list(scan.ids)
        if self.membership is not None:
            listed = set(self.membership["instrument"])
            names = [n for n in names if n in listed]
            if not names:
                raise DataError(
                    f"membership file {self._membership_path}: none of its {len(listed)} instruments "
                    f"(e.g. {sorted(listed)[:3]}) has rows in {self.path} (e.g. {list(scan.ids)[:3]}); "
                    "expected the same instrument codes in both"
                )
        self.instruments = sorted(names)
        self._rank = np.empty(len(self._ids), dtype=np.int64)  # id -> position in sorted order
        self._rank[[self._ids[n] for n in sorted(self._ids)]] = np.arange(len(self._ids))

    def iter_chunks(self, instruments_per_chunk: int = 256, start=None, end=None) -> Iterator[pd.DataFrame]:
        lo, hi = calendar_window(self.calendar, start, end, self.name)
        lo_i, hi_i = int(lo.astype(np.int64)), int(hi.astype(np.int64))
        for names in chunked(self.instruments, instruments_per_chunk):
            chunk = self._read_chunk([self._ids[n] for n in names], lo_i, hi_i)
            if len(chunk):
                yield chunk

    def open_args(self) -> dict:
        # the membership file is passed explicitly, however it was found (--membership or beside the table)
        membership = None if self._membership_path is None else str(Path(self._membership_path).resolve())
        return {"spec": str(self.path), "market": self.market, "membership": membership}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = [self.path] + ([self._membership_path] if self._membership_path else [])
            self._fingerprint = fingerprint_files(files, extra=f"long_table|{self.name}")
        return self._fingerprint

    def _read_chunk(self, ids: list[int], lo: int, hi: int) -> pd.DataFrame:
        wanted = np.zeros(len(self._ids), dtype=bool)
        wanted[ids] = True
        groups = [
            g
            for g, (g_ids, (d0, d1)) in enumerate(zip(self._row_group_ids, self._row_group_days))
            if d1 >= lo and d0 <= hi and wanted[g_ids].any()
        ]
        columns = [*REQUIRED_COLUMNS] + (["factor"] if self._has_factor else []) + self._optional
        parts: list[tuple] = []
        reader = pq.ParquetFile(self._parquet_path)
        for batch in reader.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=columns):
            bars = _normalise(batch, str(self._parquet_path), 0, self._ids.get)
            # id -1: a name the validating pass never saw, i.e. the file changed since it was opened
            if (bars.ids < 0).any():
                raise DataError(f"{self.path}: the file changed after it was opened; open it again")
            keep = wanted[bars.ids] & (bars.days >= lo) & (bars.days <= hi)
            if keep.any():
                parts.append((bars.ids[keep], bars.days[keep], {k: v[keep] for k, v in bars.values.items()}))
        if not parts:
            return bars_frame(np.empty(0, "datetime64[D]"), np.empty(0, object), {})
        ids_all = np.concatenate([p[0] for p in parts])
        days_all = np.concatenate([p[1] for p in parts])
        names = np.array(list(self._ids), dtype=object)
        order = np.lexsort((days_all, self._rank[ids_all]))
        values = {k: np.concatenate([p[2][k] for p in parts])[order] for k in parts[0][2]}
        return bars_frame(days_all[order].astype("datetime64[D]"), names[ids_all[order]], values)


def _membership_path_for(table: Path, market: str, membership) -> Path | None:
    if membership is not None:
        return Path(membership)
    if market == "all":
        return None
    # Convention of the shared data: <market>_membership.csv beside the table.
    candidate = table.parent / f"{market}_membership.csv"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"--market {market}: a long table has no markets of its own and {candidate} does not exist; "
        "pass --membership FILE (instrument, start_date, end_date) or --market all"
    )


class _Bars:
    """One normalised batch: integer days since 1970, instrument ids, float64 columns."""

    __slots__ = ("days", "ids", "names", "values")

    def __init__(self, days, ids, names, values):
        self.days, self.ids, self.names, self.values = days, ids, names, values


class _TableScan:
    """The validating first pass over a long table (see LongTableSource)."""

    def __init__(self, path: Path, csv_copy_to: Path | None):
        self.path = path
        self.is_csv = csv_copy_to is not None
        self.ids: dict[str, int] = {}
        self.row_group_ids: list[np.ndarray] = []
        self.row_group_days: list[tuple[int, int]] = []
        self.n_rows = 0
        self._last_day = np.empty(0, dtype=np.int64)
        self._last_row = np.empty(0, dtype=np.int64)
        self._days_seen: list[np.ndarray] = []
        if not path.is_file():
            raise DataError(f"{path}: no such file (expected a long table: {', '.join(REQUIRED_COLUMNS)}[, factor])")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty (expected a header {','.join(REQUIRED_COLUMNS)} and rows)")
        if self.is_csv:
            self._scan_csv(csv_copy_to)
        else:
            self._scan_parquet()
        if self.n_rows == 0:
            raise DataError(f"{path}: the file has a header but no rows (expected one row per date and instrument)")
        self.calendar = np.unique(np.concatenate(self._days_seen)).astype("datetime64[D]")

    def _columns(self, found: list[str]) -> list[str]:
        check_columns(found, REQUIRED_COLUMNS, str(self.path))
        self.has_factor = "factor" in found
        self.optional = [c for c in OPTIONAL_COLUMNS if c in found]
        return [*REQUIRED_COLUMNS] + (["factor"] if self.has_factor else []) + self.optional

    def _scan_parquet(self) -> None:
        try:
            reader = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{self.path}: not a readable Parquet file ({error})") from None
        columns = self._columns(reader.schema_arrow.names)
        for group in range(reader.num_row_groups):
            self._start_group()
            for batch in reader.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=columns):
                self._check(batch)
            self._end_group()

    def _scan_csv(self, copy_to: Path) -> None:
        with open(self.path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise DataError(f"{self.path}: the file is empty (expected a header {','.join(REQUIRED_COLUMNS)} and rows)")
        columns = self._columns([h.strip() for h in header])
        # Everything as strings: the casts below then report the exact row and value that is wrong.
        convert = pa_csv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.string() for c in columns},
            strings_can_be_null=True,
            null_values=_CSV_NULLS,
        )
        schema = pa.schema(
            [("date", pa.date32()), ("instrument", pa.string())]
            + [(c, pa.float64()) for c in columns[2:]]
        )
        try:
            reader = pa_csv.open_csv(
                self.path, read_options=pa_csv.ReadOptions(block_size=16 << 20), convert_options=convert
            )
            with pq.ParquetWriter(copy_to, schema) as writer:
                for batch in reader:
                    if batch.num_rows == 0:
                        continue  # writes no row group, so it must not get a row-group entry either
                    self._start_group()
                    bars = self._check(batch)
                    columns_out = [pa.array(bars.days.astype(np.int32), pa.int32()).cast(pa.date32()), bars.names]
                    columns_out += [pa.array(bars.values[c]) for c in columns[2:]]
                    # One row group per CSV block keeps row_group_ids aligned with the file's row groups.
                    writer.write_batch(pa.RecordBatch.from_arrays(columns_out, schema=schema), row_group_size=batch.num_rows)
                    self._end_group()
        except pa.ArrowInvalid as error:
            raise DataError(f"{self.path}: not a well-formed CSV file ({error})") from None

    def _start_group(self) -> None:
        self._group_ids: list[np.ndarray] = []
        self._group_days = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]

    def _end_group(self) -> None:
        ids = np.unique(np.concatenate(self._group_ids)) if self._group_ids else np.empty(0, np.int64)
        self.row_group_ids.append(ids)
        self.row_group_days.append(tuple(self._group_days))

    def _id_of(self, name: str) -> int:
        return self.ids.setdefault(name, len(self.ids))

    def _check(self, batch: pa.RecordBatch) -> _Bars:
        first_row = self.n_rows
        bars = _normalise(batch, str(self.path), first_row, self._id_of, csv=self.is_csv)
        self.n_rows += batch.num_rows
        if batch.num_rows == 0:
            return bars
        if len(self._last_day) < len(self.ids):
            grow = len(self.ids) - len(self._last_day)
            self._last_day = np.concatenate([self._last_day, np.full(grow, np.iinfo(np.int64).min)])
            self._last_row = np.concatenate([self._last_row, np.full(grow, -1)])
        _check_values(bars, self.path, self._where, first_row)
        self._check_order(bars, first_row)
        self._group_ids.append(np.unique(bars.ids))
        self._group_days = [min(self._group_days[0], int(bars.days.min())), max(self._group_days[1], int(bars.days.max()))]
        self._days_seen.append(np.unique(bars.days))
        return bars

    def _check_order(self, bars: _Bars, first_row: int) -> None:
        """Within each instrument, dates must strictly increase in file order (date- or instrument-major both pass)."""
        order = np.argsort(bars.ids, kind="stable")
        ids, days = bars.ids[order], bars.days[order]
        rows = order.astype(np.int64) + first_row
        starts = np.ones(len(ids), dtype=bool)
        starts[1:] = ids[1:] != ids[:-1]
        previous_day = np.empty_like(days)
        previous_day[1:] = days[:-1]
        previous_row = np.empty_like(rows)
        previous_row[1:] = rows[:-1]
        previous_day[starts] = self._last_day[ids[starts]]
        previous_row[starts] = self._last_row[ids[starts]]
        bad = np.flatnonzero(days <= previous_day)
        if len(bad):
            k = bad[np.argmin(rows[bad])]
            name = bars.names[int(order[k])].as_py()
            day, before = np.datetime64(int(days[k]), "D"), np.datetime64(int(previous_day[k]), "D")
            repeated_row = int(previous_row[k]) if day == before else self._earlier_row(name, int(days[k]), int(rows[k]))
            if repeated_row is not None:
                raise DataError(
                    f"{self.path}: duplicate (date, instrument) row: {self._where(int(rows[k]))} repeats "
                    f"{name} on {day} from {self._where(repeated_row)}; expected one row per date and instrument"
                )
            raise DataError(
                f"{self.path}: rows are not sorted: {self._where(int(rows[k]))} has {name} on {day} after "
                f"{before} at {self._where(int(previous_row[k]))}; expected each instrument's dates to strictly "
                "increase in file order (sort by instrument then date, or by date then instrument)"
            )
        ends = np.ones(len(ids), dtype=bool)
        ends[:-1] = ids[1:] != ids[:-1]
        self._last_day[ids[ends]] = days[ends]
        self._last_row[ids[ends]] = rows[ends]

    def _earlier_row(self, name: str, day: int, before_row: int) -> int | None:
        """Row of an earlier (day, name), found by re-reading the file: only runs to word an error."""
        if self.is_csv:
            convert = pa_csv.ConvertOptions(
                include_columns=["date", "instrument"], column_types={"date": pa.string(), "instrument": pa.string()}
            )
            batches = pa_csv.open_csv(self.path, convert_options=convert)
        else:
            batches = pq.ParquetFile(self.path).iter_batches(batch_size=_BATCH_ROWS, columns=["date", "instrument"])
        first_row = 0
        for batch in batches:
            if first_row >= before_row:
                break
            bars = _normalise(batch, str(self.path), first_row, {name: 0}.get, csv=self.is_csv)
            hits = np.flatnonzero((bars.ids == 0) & (bars.days == day))
            if len(hits) and first_row + hits[0] < before_row:
                return int(first_row + hits[0])
            first_row += batch.num_rows
        return None

    def _where(self, row: int) -> str:
        # Data rows count from 1; in a CSV the header is line 1, so data row r sits on line r + 1.
        return f"row {row + 1} (line {row + 2})" if self.is_csv else f"row {row + 1}"


def _check_values(bars: _Bars, path: Path, where, first_row: int) -> None:
    for name, values in bars.values.items():
        present = ~np.isnan(values)
        if name in ("volume", "amount"):
            ok, expected = (values >= 0) & np.isfinite(values), f"a {name} >= 0 (NaN for a missing value)"
        else:
            ok, expected = (values > 0) & np.isfinite(values), "a positive price (NaN for a missing bar)"
            if name == "factor":
                expected = "a positive adjustment factor (NaN for a missing value)"
        bad = np.flatnonzero(present & ~ok)
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{path}: column {name!r}, {where(first_row + row)} "
                f"({bars.names[row].as_py()}, {np.datetime64(int(bars.days[row]), 'D')}): "
                f"value {values[row]!r}; expected {expected}"
            )


def _normalise(batch: pa.RecordBatch, file: str, first_row: int, id_of, csv: bool = False) -> _Bars:
    """Arrow batch -> days (int64), instrument ids (int64), float64 columns, with typed errors."""

    def where(row: int) -> str:
        return f"row {first_row + row + 1} (line {first_row + row + 2})" if csv else f"row {first_row + row + 1}"

    names = batch.column(batch.schema.get_field_index("instrument"))
    if not (pa.types.is_string(names.type) or pa.types.is_large_string(names.type)):
        names = pc.cast(names, pa.string())
    names = pc.utf8_trim_whitespace(names) if csv else names
    if names.null_count:
        row = int(np.flatnonzero(names.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file}: column 'instrument', {where(row)}: empty; expected an instrument code in every row")
    encoded = pc.dictionary_encode(names)
    lookup = np.array([-1 if (i := id_of(v)) is None else i for v in encoded.dictionary.to_pylist()], dtype=np.int64)
    ids = lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(lookup) else np.empty(0, np.int64)
    days = _days(batch.column(batch.schema.get_field_index("date")), file, where)
    values = {}
    for name in batch.schema.names:
        if name not in ("date", "instrument"):
            values[name] = _floats(batch.column(batch.schema.get_field_index(name)), name, file, where)
    return _Bars(days, ids, names, values)


def _days(column: pa.Array, file: str, where) -> np.ndarray:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        trimmed = pc.utf8_trim_whitespace(column)
        try:
            column = pc.cast(trimmed, pa.timestamp("s"))
        except pa.ArrowInvalid:
            parsed = pd.to_datetime(pd.Series(trimmed.to_pylist(), dtype=object), errors="coerce", format="mixed")
            bad = np.flatnonzero(parsed.isna().to_numpy() & ~trimmed.is_null().to_numpy(zero_copy_only=False))
            if len(bad):
                row = int(bad[0])
                raise DataError(
                    f"{file}: column 'date', {where(row)}: {trimmed[row].as_py()!r} is not a date; "
                    "expected dates like 2020-01-31"
                ) from None
            column = pa.array(parsed.to_numpy().astype("datetime64[s]"), mask=parsed.isna().to_numpy())
        kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date64(kind):
        column = pc.cast(column, pa.date32(), safe=False)
    elif not pa.types.is_date32(kind):
        raise DataError(f"{file}: column 'date' has type {kind}; expected dates (date, timestamp or 'YYYY-MM-DD' text)")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{file}: column 'date', {where(row)}: empty; expected a date in every row")
    return column.cast(pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)


def _parses_as_float(text: str) -> bool:
    try:
        pc.cast(pa.array([text]), pa.float64())
    except pa.ArrowInvalid:
        return False
    return True


def _floats(column: pa.Array, name: str, file: str, where) -> np.ndarray:
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        trimmed = pc.utf8_trim_whitespace(column)
        try:
            column = pc.cast(trimmed, pa.float64())
        except pa.ArrowInvalid:
            texts = trimmed.to_pylist()
            row = next((r for r, t in enumerate(texts) if t is not None and not _parses_as_float(t)), 0)
            raise DataError(
                f"{file}: column {name!r}, {where(row)}: {texts[row]!r} is not a number; expected numeric "
                "values (leave the cell empty or NaN for a missing value)"
            ) from None
    elif not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_decimal(kind) or pa.types.is_null(kind)):
        raise DataError(f"{file}: column {name!r} has type {kind}; expected numbers (float or integer)")
    return column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------------------
# spec -> source


def open_source(spec: str, *, market: str = "all", membership: str | Path | None = None) -> BarSource:
    """A directory -> Qlib binary data; a .parquet/.csv file -> long table; 'synthetic[:k=v,...]' -> generator.

    `market` picks instruments/<market>.txt in a Qlib directory; for a long table a market other than
    "all" means the `<market>_membership.csv` beside it. `membership` (a CSV/Parquet file) overrides
    both. The synthetic generator always uses its own listing/delisting membership.
    """
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from fvae_dist.data.synthetic import parse_synthetic_spec

        return parse_synthetic_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        from fvae_dist.data.qlib_bin import QlibBinSource

        return QlibBinSource(path, market=market, membership=membership)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and (suffixes[-1] == ".parquet" or ".csv" in suffixes):
        if not path.is_file():
            raise ConfigError(f"--source {spec}: no such file")
        return LongTableSource(path, market=market, membership=membership)
    if not path.exists():
        raise ConfigError(
            f"--source {spec}: no such file or directory; expected a Qlib binary directory, a .parquet/.csv "
            "long table, or 'synthetic[:stocks=300,days=1000,seed=0]'"
        )
    raise ConfigError(f"--source {spec}: unknown file type {path.suffix!r}; expected .parquet or .csv")
