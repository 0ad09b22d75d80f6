"""The long-table reader: a Parquet or CSV table of daily bars, one row per (date, instrument).

    LongTableSource(path, market="all", membership=None)   a BarSource (data/bars.py)

Validated in one streaming pass (columns, types, prices, duplicates, order), then read back a
chunk of instruments at a time in the layout data/bars.py describes.
"""
from __future__ import annotations

import csv
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fvae_dist.data.bars import (
    _BATCH_ROWS,
    _CSV_NULLS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    bars_frame,
    calendar_window,
    check_columns,
    chunked,
    fingerprint_files,
    read_membership,
)
from fvae_dist.errors import ConfigError, DataError


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


