"""Train / valid / test date ranges: parsing, defaults and the checks that keep them apart."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fvae_dist.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass(frozen=True)
class Splits:
    """Inclusive (start, end) trading days of each split, as datetime64[D]."""

    train: tuple[np.datetime64, np.datetime64]
    valid: tuple[np.datetime64, np.datetime64]
    test: tuple[np.datetime64, np.datetime64]

    def __getitem__(self, name: str) -> tuple[np.datetime64, np.datetime64]:
        return getattr(self, name)

    def items(self):
        return [(name, self[name]) for name in SPLIT_NAMES]

    def to_json(self) -> dict:
        return {name: [str(start), str(end)] for name, (start, end) in self.items()}


def parse_range(text: str, setting: str) -> tuple[np.datetime64, np.datetime64]:
    """'2010-01-01:2017-12-31' -> (start, end)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ConfigError(f"{setting} {text!r}: expected START:END, e.g. 2010-01-01:2017-12-31")
    try:
        start, end = (np.datetime64(p.strip(), "D") for p in parts)
    except ValueError as exc:
        raise ConfigError(f"{setting} {text!r}: dates must be YYYY-MM-DD ({exc})") from None
    if start > end:
        raise ConfigError(f"{setting} {text!r}: start is after end")
    return start, end


def resolve_splits(calendar, splits: Splits | dict | None, warmup_days: int = 20) -> Splits:
    """Snap the ranges to trading days and check them; default to 70/15/15 of the calendar."""
    calendar = np.asarray(calendar, dtype="datetime64[D]")
    if splits is None:
        usable = calendar[min(warmup_days, len(calendar) - 1) :]
        if len(usable) < 30:
            raise DataError(f"only {len(calendar)} trading days: too few to split into train/valid/test")
        cuts = np.cumsum([int(len(usable) * f) for f in DEFAULT_FRACTIONS[:2]])
        pieces = np.split(usable, cuts)
        splits = {name: (p[0], p[-1]) for name, p in zip(SPLIT_NAMES, pieces)}
    elif isinstance(splits, Splits):
        splits = dict(splits.items())
    snapped = {}
    for name in SPLIT_NAMES:
        if name not in splits:
            raise ConfigError(f"--{name}: missing; give all of --train, --valid and --test or none")
        start, end = (np.datetime64(d, "D") for d in splits[name])
        days = calendar[(calendar >= start) & (calendar <= end)]
        if days.size == 0:
            raise DataError(
                f"--{name} {start}..{end}: no trading days in this range; "
                f"the data covers {calendar[0]}..{calendar[-1]}"
            )
        snapped[name] = (days[0], days[-1])
    for earlier, later in zip(SPLIT_NAMES, SPLIT_NAMES[1:]):
        if snapped[earlier][1] >= snapped[later][0]:
            raise ConfigError(
                f"--{earlier} ends {snapped[earlier][1]} but --{later} starts {snapped[later][0]}: "
                "splits must be in time order without overlap"
            )
    return Splits(**snapped)
