"""Exceptions the CLI turns into one clear line instead of a traceback, and the two helpers that
make such lines: the nearest valid name for a misspelt one, and the user's own error inside
Ray's wrappers."""
from __future__ import annotations

import contextlib
import difflib
import logging
import sys
import traceback
from typing import Iterable, Iterator


class FvaeError(Exception):
    """Base class: the message names the file, column or setting and what was expected."""


class DataError(FvaeError, ValueError):
    """Bad input data: missing columns, wrong types, duplicates, impossible prices, empty ranges."""


class ConfigError(FvaeError, ValueError):
    """A setting that is unknown, out of range or inconsistent with the data or the cluster."""


class ClusterError(FvaeError):
    """The Ray cluster lost what a run needed (a worker's process or node); rerunning resumes."""


def nearest_name(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate `name` most likely misspells: a close spelling, the same name in another
    case, or a dotted key that ends with it ("lr" -> "train.lr"); None when nothing is near."""
    candidates = list(candidates)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    match = match or [c for c in candidates if c.lower() == name.lower()]
    match = match or [c for c in candidates if c.endswith(f".{name}")]
    return match[0] if match else None


def nearest_name_hint(name: str, candidates) -> str:
    """'; did you mean ...?' for a misspelt key, else the list of valid ones."""
    match = nearest_name(name, candidates)
    return f"; did you mean {match!r}?" if match else f"; valid: {', '.join(sorted(candidates))}"


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first: what a Train run's failure says its workers
    or controller raised, what a Ray task error carries, then __cause__ / __context__."""
    seen: set[int] = set()
    pending = [exc] if exc is not None else []
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None) or {}  # ray.train.WorkerGroupError
        pending += list(failures.values())
        pending += [getattr(current, "controller_failure", None),  # ray.train.ControllerError
                    getattr(current, "cause", None),               # ray.exceptions.RayTaskError
                    current.__cause__, current.__context__]
        pending = [p for p in pending if isinstance(p, BaseException)]


def user_error(exc: BaseException) -> FvaeError | None:
    """The first FvaeError (bad resume, bad data, bad setting) inside `exc`, as one line."""
    for inner in exception_chain(exc):
        # A Ray task error is an instance of the task's exception class too
        # (RayTaskError(DataError)), but its text is the remote traceback: the exception itself
        # is its `cause`, which comes next in the chain.
        if isinstance(inner, FvaeError) and not isinstance(getattr(inner, "cause", None), BaseException):
            text = str(inner).splitlines()[0] if str(inner) else repr(inner)
            return type(inner)(text)
    return None


@contextlib.contextmanager
def quiet_reported_errors(logger_names: Iterable[str] = ("ray", "ray.data")) -> Iterator[None]:
    """While active, the console handlers of these loggers drop records about an exception that
    holds an FvaeError: the caller re-raises that error and the CLI prints it as one line.

    Ray Data logs a failed task's traceback twice on the console before re-raising it (once
    from the executor thread, once from the caller's); its log files keep them."""
    quiet = _ReportedErrorFilter()
    handlers = [handler for name in logger_names for handler in logging.getLogger(name).handlers
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


class _ReportedErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # the record's own exception, or the one being handled where it was logged (Ray Data's
        # "Exception occurred in ..." line carries none itself)
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return error is None or user_error(error) is None


def error_line(exc: BaseException) -> str:
    """One line for a results table: the user's own error when there is one, else the innermost
    exception's last line (what a traceback ends with)."""
    mine = user_error(exc)
    if mine is not None:
        return f"{type(mine).__name__}: {mine}"
    innermost = list(exception_chain(exc))[-1]
    lines = [line for line in traceback.format_exception_only(type(innermost), innermost)[-1].splitlines()
             if line.strip()]
    return lines[-1] if lines else repr(innermost)
