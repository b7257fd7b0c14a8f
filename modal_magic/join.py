"""Outcomes to columns: each row's result and error, aligned to the original rows by position.

Outcomes arrive in completion order; the engine files each one under its row's position, and this
module turns the filled-in lists into columns on a copy of the frame. The result column gets the
dtype pandas would infer for the values, with nullable dtypes (``Int64``, ``boolean``) where failed
rows leave holes, so a column of ints with one failure doesn't silently become floats; values no
nullable dtype can hold (ints past 64 bits) fall back to ``object``, so a join never loses a run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from .errors import RowError

__all__ = ["result_series", "error_series", "seconds_column", "seconds_series", "attach", "clashing_columns",
           "expand_dicts", "not_a_dict"]

_COPY_ON_WRITE = int(pd.__version__.split(".")[0]) >= 3


def result_series(values: list[Any], failed: set[int], index: pd.Index) -> pd.Series:
    """The result column: pandas' inferred dtype, made nullable where failed rows leave holes.

    Examples
    --------
    >>> result_series([1, None, 3], {1}, pd.RangeIndex(3)).dtype
    Int64Dtype()
    >>> result_series([1, 2, 3], set(), pd.RangeIndex(3)).dtype
    dtype('int64')
    """
    if not failed:
        fast = _uniform_numeric(values)
        if fast is not None:
            return pd.Series(fast, index=index)
        return pd.Series(values, index=index)
    ok = pd.Series([v for i, v in enumerate(values) if i not in failed])
    candidates = _nullable_dtypes(ok.dtype)
    for dtype in candidates:
        try:
            return pd.Series(pd.array(values, dtype=dtype), index=index)
        except (OverflowError, TypeError, ValueError):
            # e.g. ints past int64: a dtype that can't hold every value must never lose the run
            continue
    return pd.Series(values, index=index, dtype=object if candidates else None)


def _nullable_dtypes(inferred: Any) -> tuple[str, ...]:
    """The dtypes to try, in order, for a column whose succeeded values pandas infers as ``inferred``.

    ``uint64`` is what pandas infers for ints past int64's range; object is the fallback after these.
    """
    if ptypes.is_bool_dtype(inferred):
        return ("boolean",)
    if ptypes.is_unsigned_integer_dtype(inferred):
        return ("UInt64",)
    if ptypes.is_integer_dtype(inferred):
        return ("Int64", "UInt64")
    if ptypes.is_float_dtype(inferred):
        return ("float64",)
    return ()


def error_series(errors: dict[int, RowError], n: int, index: pd.Index) -> pd.Series:
    """The ``<into>_error`` column: ``None`` where the row succeeded, else its :class:`RowError`."""
    column = np.empty(n, dtype=object)  # all None, without pandas inspecting n Python objects
    for position, error in errors.items():
        column[position] = error
    return pd.Series(column, index=index, dtype=object, copy=False)


def seconds_column(into: str) -> str:
    """The name of the per-row seconds column (``timings=True``) of the result ``into``.

    Examples
    --------
    >>> seconds_column("label")
    'label_seconds'
    """
    return f"{into}_seconds"


def seconds_series(seconds: np.ndarray, index: pd.Index) -> pd.Series:
    """The ``<into>_seconds`` column: float64, NaN for rows that came from the cache or never ran.

    Examples
    --------
    >>> seconds_series(np.array([0.5, np.nan]), pd.RangeIndex(2)).tolist()
    [0.5, nan]
    """
    return pd.Series(np.asarray(seconds, dtype=np.float64), index=index, copy=False)


_FAST_DTYPES = {int: np.int64, float: np.float64, bool: np.bool_}


def _uniform_numeric(values: list[Any]) -> np.ndarray | None:
    """Plain ints, floats or bools all of one type, as a numpy array (what pandas would infer, faster)."""
    if not values:
        return None
    kinds = set(map(type, values))
    if len(kinds) != 1:
        return None
    dtype = _FAST_DTYPES.get(kinds.pop())
    if dtype is None:
        return None
    try:
        return np.fromiter(values, dtype=dtype, count=len(values))
    except OverflowError:  # ints past int64: pandas decides (object)
        return None


def expand_dicts(values: list[Any], errors: dict[int, RowError]) -> dict[str, list[Any]]:
    """Split dict results into one list per key (first-seen key order); a non-dict becomes that row's error."""
    keys: dict[str, None] = {}
    for position, value in enumerate(values):
        if position in errors:
            continue
        if isinstance(value, dict):
            keys.update(dict.fromkeys(map(str, value)))
        elif value is not None:
            errors[position] = not_a_dict(value)
    columns: dict[str, list[Any]] = {key: [None] * len(values) for key in keys}
    for position, value in enumerate(values):
        if position not in errors and isinstance(value, dict):
            for key, item in value.items():
                columns[str(key)][position] = item
    return columns


def not_a_dict(value: Any) -> RowError:
    """The error of a row whose function returned ``value``, not a dict, under ``expand=True``.

    Examples
    --------
    >>> not_a_dict(3)
    'TypeError: expand=True needs each row to return a dict, got int'
    """
    return RowError.create("TypeError", f"expand=True needs each row to return a dict, got {type(value).__name__}")


def clashing_columns(frame: pd.DataFrame, names: list[str]) -> list[str]:
    """The names among ``names`` that ``frame`` already has."""
    return [name for name in names if name in frame.columns]


def attach(frame: pd.DataFrame, columns: dict[str, pd.Series]) -> pd.DataFrame:
    """A new frame: ``frame``'s rows and columns, with ``columns`` added (or replaced) at the end."""
    out = frame.copy(deep=not _COPY_ON_WRITE)
    for name, series in columns.items():
        # Same index object, so no alignment (duplicate labels and MultiIndex are safe), and a
        # Series keeps its dtype where a bare object array would be re-inferred as strings.
        out[name] = series if series.index is out.index else series.set_axis(out.index)
    return out
