"""Exceptions the CLI turns into one clear line instead of a traceback."""


class FvaeError(Exception):
    """Base class: the message names the file, column or setting and what was expected."""


class DataError(FvaeError, ValueError):
    """Bad input data: missing columns, wrong types, duplicates, impossible prices, empty ranges."""


class ConfigError(FvaeError, ValueError):
    """A setting that is unknown, out of range or inconsistent with the data or the cluster."""
