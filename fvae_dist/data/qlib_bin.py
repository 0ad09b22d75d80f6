"""Qlib binary data directories: a reader (`QlibBinSource`) and a small writer for test fixtures.

Layout (Qlib's `dump_bin` format, used by its community A-share data sets):

    calendars/day.txt                     one trading day per line, ascending
    instruments/<market>.txt              code <TAB> start <TAB> end   (one line per membership interval)
    features/<code lowercase>/<field>.day.bin
        little-endian float32: value 0 = index of the first day in calendars/day.txt,
        then one value per calendar day from there (NaN = no value that day)

Fields read: open, high, low, close, volume, factor when present (1.0 otherwise) and vwap when present
(VWAP0's input; Qlib's $vwap is adjusted like the prices). A day whose close is NaN has no bar and is
dropped. Values are returned as stored (no re-adjustment).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from fvae_dist.data.bars import (
    BAR_COLUMNS,
    bars_frame,
    calendar_window,
    chunked,
    fingerprint_files,
    read_membership,
)
from fvae_dist.errors import DataError

OPTIONAL_FIELDS = ("factor", "vwap")
FIELDS = (*BAR_COLUMNS, *OPTIONAL_FIELDS)
_LAYOUT = "calendars/day.txt, instruments/<market>.txt, features/<code>/<field>.day.bin"


class QlibBinSource:
    """Bars of one market of a Qlib binary directory, read instrument by instrument."""

    def __init__(self, path, *, market: str = "all", membership=None):
        self.root = Path(path).resolve()
        self.market = market
        self.name = f"qlib:{self.root}[{market}]"
        self.calendar = _read_calendar(self.root)
        self._membership_path = Path(membership) if membership is not None else _market_file(self.root, market)
        if membership is not None:
            self.membership = read_membership(membership)
        else:
            self.membership = _read_market_file(self._membership_path)
        self.instruments = sorted(set(self.membership["instrument"]))
        self._optional = {code: self._check_bins(code) for code in self.instruments}
        self._fingerprint: str | None = None

    def iter_chunks(self, instruments_per_chunk: int = 256, start=None, end=None) -> Iterator[pd.DataFrame]:
        lo, hi = calendar_window(self.calendar, start, end, self.name)
        for codes in chunked(self.instruments, instruments_per_chunk):
            frames = [self._read_instrument(code, lo, hi) for code in codes]
            frames = [f for f in frames if len(f)]
            if frames:
                yield pd.concat(frames, ignore_index=True)

    def open_args(self) -> dict:
        membership = Path(self._membership_path).resolve()
        own_market_file = (self.root / "instruments" / f"{self.market}.txt").resolve()
        return {"spec": str(self.root), "market": self.market,
                "membership": None if membership == own_market_file else str(membership)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = [self.root / "calendars" / "day.txt", self._membership_path]
            for code in self.instruments:
                fields = (*BAR_COLUMNS, *self._optional[code])
                files += [self._bin_path(code, field) for field in fields]
            self._fingerprint = fingerprint_files(files, extra=f"qlib|{self.market}")
        return self._fingerprint

    def _bin_path(self, code: str, field: str) -> Path:
        return self.root / "features" / code.lower() / f"{field}.day.bin"

    def _check_bins(self, code: str) -> tuple[str, ...]:
        """Every required bin exists and holds whole float32 values; returns the optional fields it has."""
        present = []
        for field in FIELDS:
            path = self._bin_path(code, field)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                if field in OPTIONAL_FIELDS:
                    continue
                raise DataError(
                    f"{self.name}: instrument {code} has no {path.relative_to(self.root)} "
                    f"(expected features/<code lowercase>/{{{','.join(BAR_COLUMNS)}}}.day.bin for every "
                    f"instrument of instruments/{self.market}.txt)"
                ) from None
            if size < 4 or size % 4:
                raise DataError(
                    f"{path}: truncated bin file ({size} bytes); expected a float32 start index followed by "
                    "float32 values, i.e. a positive multiple of 4 bytes"
                )
            if field in OPTIONAL_FIELDS:
                present.append(field)
        return tuple(present)

    def _read_field(self, code: str, field: str) -> tuple[int, np.ndarray]:
        path = self._bin_path(code, field)
        raw = np.fromfile(path, dtype="<f4")
        if len(raw) == 0 or path.stat().st_size % 4:
            raise DataError(f"{path}: truncated bin file ({path.stat().st_size} bytes); expected a multiple of 4 bytes")
        first = float(raw[0])
        if not (np.isfinite(first) and first >= 0 and first == int(first)):
            raise DataError(f"{path}: first value {first!r} is not a calendar index (expected an integer >= 0)")
        first, values = int(first), raw[1:]
        if first + len(values) > len(self.calendar):
            raise DataError(
                f"{path}: holds {len(values)} days from calendar index {first}, past the "
                f"{len(self.calendar)} days of calendars/day.txt (bin file and calendar do not match)"
            )
        return first, values

    def _read_instrument(self, code: str, lo: np.datetime64, hi: np.datetime64) -> pd.DataFrame:
        first, close = self._read_field(code, "close")
        index = np.arange(first, first + len(close))
        days = self.calendar[index]
        keep = ~np.isnan(close) & (days >= lo) & (days <= hi)
        values = {"close": close[keep]}
        for field in FIELDS:
            if field == "close" or (field in OPTIONAL_FIELDS and field not in self._optional[code]):
                continue
            f_first, f_values = self._read_field(code, field)
            aligned = np.full(len(close), np.nan, dtype=np.float32)
            # fields may start/end on different days: copy the overlap of the two spans
            lo_i, hi_i = max(first, f_first), min(first + len(close), f_first + len(f_values))
            if hi_i > lo_i:
                aligned[lo_i - first : hi_i - first] = f_values[lo_i - f_first : hi_i - f_first]
            values[field] = aligned[keep]
        return bars_frame(days[keep], np.full(int(keep.sum()), code, dtype=object), values)


def _read_calendar(root: Path) -> np.ndarray:
    path = root / "calendars" / "day.txt"
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a Qlib data directory: {_LAYOUT})")
    if not path.is_file():
        raise DataError(f"{root}: not a Qlib data directory, calendars/day.txt is missing (expected {_LAYOUT})")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: empty; expected one trading day per line")
    days = []
    for number, text in lines:
        try:
            days.append(np.datetime64(pd.Timestamp(text).date(), "D"))
        except ValueError:
            raise DataError(f"{path}: line {number}: {text!r} is not a date (expected e.g. 2020-01-31)") from None
    calendar = np.array(days, dtype="datetime64[D]")
    not_increasing = np.flatnonzero(np.diff(calendar) <= np.timedelta64(0, "D"))
    if len(not_increasing):
        k = int(not_increasing[0])
        raise DataError(f"{path}: line {lines[k + 1][0]}: {calendar[k + 1]} does not come after {calendar[k]}; expected ascending unique days")
    return calendar


def _market_file(root: Path, market: str) -> Path:
    path = root / "instruments" / f"{market}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in (root / "instruments").glob("*.txt"))
        raise DataError(
            f"{root}: market {market!r} not found (no instruments/{market}.txt); "
            f"available markets: {', '.join(available) or 'none (instruments/ is empty or missing)'}"
        )
    return path


def _read_market_file(path: Path) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        try:
            code, start, end = (p.strip() for p in parts[:3])
            rows.append((code, pd.Timestamp(start), pd.Timestamp(end)))
            if len(parts) < 3 or rows[-1][2] < rows[-1][1]:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}: line {number}: {line.strip()!r}; expected 'CODE<TAB>start<TAB>end' with start <= end"
            ) from None
    if not rows:
        raise DataError(f"{path}: no instruments (expected one 'CODE<TAB>start<TAB>end' line per interval)")
    frame = pd.DataFrame(rows, columns=["instrument", "start_date", "end_date"])
    frame["start_date"] = frame["start_date"].astype("datetime64[ns]")
    frame["end_date"] = frame["end_date"].astype("datetime64[ns]")
    return frame.sort_values(["instrument", "start_date"], kind="stable").reset_index(drop=True)


def write_qlib_dir(bars: pd.DataFrame, path, market: str = "all", membership: pd.DataFrame | None = None) -> Path:
    """Write long bars (date, instrument, open, high, low, close, volume[, factor]) as a Qlib directory.

    The calendar is the set of dates in `bars`; each instrument's bins span its first to last bar, NaN
    on days without a bar. instruments/<market>.txt lists `membership` when given, else each
    instrument's first and last day; instruments/all.txt is always written. For test fixtures and
    small exports: it holds one instrument at a time in memory besides `bars`.
    """
    root = Path(path)
    for folder in ("calendars", "instruments", "features"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    dates = bars["date"].to_numpy(dtype="datetime64[D]")
    calendar = np.unique(dates)
    (root / "calendars" / "day.txt").write_text("".join(f"{d}\n" for d in calendar))
    fields = [f for f in FIELDS if f in bars.columns]
    spans = []
    positions = np.searchsorted(calendar, dates)
    for code, rows in bars.groupby("instrument", sort=True).indices.items():
        index = positions[rows]
        first, last = int(index.min()), int(index.max())
        folder = root / "features" / str(code).lower()
        folder.mkdir(exist_ok=True)
        for field in fields:
            values = np.full(last - first + 1, np.nan, dtype="<f4")
            values[index - first] = bars[field].to_numpy(dtype=np.float64)[rows]
            np.concatenate([np.array([first], dtype="<f4"), values]).tofile(folder / f"{field}.day.bin")
        spans.append((str(code), calendar[first], calendar[last]))
    all_lines = "".join(f"{code}\t{a}\t{b}\n" for code, a, b in spans)
    (root / "instruments" / "all.txt").write_text(all_lines)
    if membership is not None:
        lines = "".join(
            f"{r.instrument}\t{pd.Timestamp(r.start_date).date()}\t{pd.Timestamp(r.end_date).date()}\n"
            for r in membership.itertuples()
        )
        (root / "instruments" / f"{market}.txt").write_text(lines)
    elif market != "all":
        (root / "instruments" / f"{market}.txt").write_text(all_lines)
    return root
