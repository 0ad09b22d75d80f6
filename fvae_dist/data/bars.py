"""Raw daily bars: the `BarSource` protocol, shared reader helpers and membership files.

Every source hands out the same long frames, a few hundred instruments at a time:

    date (datetime64[ns]), instrument (str), open, high, low, close, volume, factor (float64)
    [, vwap, amount]  (float64, only when the source has them: VWAP0's input, see `bar_vwap`)

sorted by (instrument, date), each chunk holding the complete history (within [start, end]) of its
instruments, so feature code never has to stitch an instrument together across chunks. `factor` is 1.0
when the source has none. A NaN close means "no bar that day".

The readers live beside this module: `long_table.py` (Parquet/CSV long tables), `qlib_bin.py` (Qlib
binary directories) and `synthetic.py` (the factor-model generator). `open_source` picks one.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import pyarrow as pa

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
        from fvae_dist.data.long_table import LongTableSource

        return LongTableSource(path, market=market, membership=membership)
    if not path.exists():
        raise ConfigError(
            f"--source {spec}: no such file or directory; expected a Qlib binary directory, a .parquet/.csv "
            "long table, or 'synthetic[:stocks=300,days=1000,seed=0]'"
        )
    raise ConfigError(f"--source {spec}: unknown file type {path.suffix!r}; expected .parquet or .csv")
