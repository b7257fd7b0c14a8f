"""Running a result frame's failed rows again: ``out.modal.retry_failed()`` and the magic's ``--retry-failed``.

The frame says (through :mod:`modal_magic.runs`) how each result column was made; the failed rows
go through :func:`modal_magic.engine.map_frame` again and are merged back in place.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd

from . import join
from .engine import map_frame
from .errors import RowError
from .runs import LAST_RESULT_ERRORS, RunSpec, runs_columns, runs_error_column, set_last_result, spec_for

__all__ = ["retry_failed", "rerun_failed"]


def retry_failed(frame: pd.DataFrame, into: str | None = None, *, fn: Callable[..., Any] | None = None,
                 errors_call: str = LAST_RESULT_ERRORS, **overrides: Any) -> pd.DataFrame:
    """Run again only the failed rows of a result frame; return the completed frame.

    ``frame`` is what a map returned (it remembers how each result column was made); ``into``
    picks one result column when it has several. ``fn`` runs the failed rows with a fixed function
    instead of the first run's. ``overrides`` change options for the retry (``retries=3``,
    ``gpu="A100"``, ``timeout=...``). Rows that succeeded are kept as they are.

    Examples
    --------
    >>> import pandas as pd
    >>> import modal_magic
    >>> flaky = {"calls": 0}
    >>> def f(x):
    ...     flaky["calls"] += 1
    ...     if x == 2 and flaky["calls"] < 4:
    ...         raise ConnectionError("try again")
    ...     return x * 10
    >>> out = pd.DataFrame({"x": [1, 2, 3]}).modal.map(f, column="x", backend="sequential", progress=False)
    >>> out["f_error"].tolist()
    [None, 'ConnectionError: try again', None]
    >>> out.modal.retry_failed(progress=False)["f"].tolist()
    [10, 20, 30]
    """
    runs: dict[str, str] = frame.attrs.get(RunSpec.ATTRS_KEY, {})
    if not runs:
        raise ValueError(
            "this DataFrame doesn't say how its results were made: call retry_failed() on the frame "
            "that df.modal.map(...) returned (or one derived from it)"
        )
    if into is not None and into not in runs:
        raise KeyError(f"no result column {into!r} to retry; this frame has: {', '.join(map(repr, runs))}")
    out = frame
    for name in [into] if into is not None else list(runs):
        error_column = runs_error_column(out, name)
        if error_column in out.columns and not any(isinstance(e, RowError) for e in out[error_column].tolist()):
            continue  # nothing failed: no function needed (and none is kept for a run without failures)
        spec = spec_for(runs[name], name, fn=fn)
        out = rerun_failed(out, name, spec, overrides, errors_call=errors_call)
    set_last_result(out)
    return out


def rerun_failed(frame: pd.DataFrame, into: str, spec: RunSpec, overrides: dict[str, Any] | None = None, *,
                 errors_call: str = LAST_RESULT_ERRORS, magic: bool = False) -> pd.DataFrame:
    """Run ``spec`` again on the rows of ``frame`` whose ``spec.error_column`` holds an error.

    :func:`retry_failed` finds the spec the frame recorded; the ``%%modal_map --retry-failed``
    magic builds one from its cell instead (so an edited function is used).
    """
    overrides = overrides or {}
    if spec.error_column not in frame.columns:
        raise KeyError(f"the error column {spec.error_column!r} is gone from this frame, so its failed rows can't be found")
    errors = frame[spec.error_column]
    failed = [i for i, e in enumerate(errors.tolist()) if isinstance(e, RowError)]
    if not failed:
        set_last_result(frame)
        return frame
    options = spec.options.replace(**{"sample": None, **overrides, "overwrite": True})
    subset = frame.iloc[failed]
    redo = map_frame(subset, spec.fn, columns=list(spec.columns), star=spec.star, into=into, options=options,
                     errors_call=errors_call, runtime=spec.runtime, magic=magic)
    columns: dict[str, pd.Series] = {}
    new_errors = redo[spec.error_column].tolist()
    merged_errors = errors.tolist()
    for j, position in enumerate(failed):
        merged_errors[position] = new_errors[j]
    still_failed = {i for i, e in enumerate(merged_errors) if isinstance(e, RowError)}
    for name in dict.fromkeys((*spec.result_columns, *runs_columns(redo, into))):
        values = frame[name].astype(object).tolist() if name in frame.columns else [None] * len(frame)
        fresh = redo[name].astype(object).tolist()
        for j, position in enumerate(failed):
            values[position] = fresh[j]
        values = [None if i in still_failed else v for i, v in enumerate(values)]
        columns[name] = join.result_series(values, still_failed, frame.index)
    columns[spec.error_column] = pd.Series(merged_errors, index=frame.index, dtype=object)
    timed = join.seconds_column(into)
    if timed in redo.columns:  # timings=True: the retried rows' times replace their failed tries'
        seconds = (frame[timed] if timed in frame.columns else pd.Series(np.nan, index=frame.index)).to_numpy(
            dtype=np.float64, copy=True)
        seconds[failed] = redo[timed].to_numpy(dtype=np.float64)
        columns[timed] = join.seconds_series(seconds, frame.index)
    out = join.attach(frame, columns)
    set_last_result(out)
    return out
