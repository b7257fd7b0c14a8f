"""Records of recent runs: how each result column was made, the last result, the last summary.

A finished run is counted once, here (:func:`summarize`), into the :class:`RunSummary` that the bar's
summary line and ``last_run()`` both show; :class:`Wording` says how it names things for its caller.

A result frame carries ``{into: run id}`` in its ``attrs`` (plain strings, so it pickles and writes
to Parquet); the run id leads here to a :class:`RunSpec` (the function, columns and options) so
``out.modal.retry_failed()`` can run the failed rows again. A spec holds the user's function with
its closure and globals (a model, a big lookup table, an LLM session), and keeping every run's for
the life of the kernel grew one process by gigabytes; so the function is kept only for the last
:data:`MAX_RUNS` runs that had failed rows (the only ones a retry has work for), and the rest of a
run's record (column names, a few bytes) for the last :data:`MAX_RECORDS`. A frame from an older
run gets a clear error instead; running its cell again is cheap, since the cache skips the rows
already done.

Examples
--------
>>> import modal_magic, pandas as pd
>>> out = pd.DataFrame({"x": [1, 2]}).modal.map(lambda x: x + 1, column="x", backend="sequential",
...                                             progress=False)
>>> last_result() is out, runs_columns(out, "result")
(True, ('result',))
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from .errors import RowError, ShortTraceback
from .progress.summary import RunSummary

if TYPE_CHECKING:
    import pandas as pd

    from .backends.base import Runtime
    from .options import MapOptions

__all__ = ["LAST_RESULT_ERRORS", "Wording", "summarize", "columns_made", "RunSpec", "MAX_RUNS", "MAX_RECORDS", "RunExpired", "remember", "spec_for", "runs_columns", "last_result",
           "last_run", "set_last_result", "set_last_run", "recorded_run", "amend_last_run", "runs_error_column"]

#: how many runs with failed rows keep their function for ``retry_failed()``; older ones drop it
MAX_RUNS = 8
#: how many runs keep the rest of their record (the columns they wrote), which costs a few bytes
MAX_RECORDS = 1024


@dataclass(frozen=True)
class RunSpec:
    """How a result column was made, kept (for the last few runs) so failed rows can be run again."""

    fn: Callable[..., Any] | None
    columns: tuple[Any, ...]
    star: bool
    options: MapOptions
    error_column: str
    result_columns: tuple[str, ...] = ()
    runtime: Runtime | None = None  # what the backend needed beyond fn (an LLM run's meter, processes)

    #: the key under ``DataFrame.attrs`` holding ``{into: run id}``: plain strings, so a frame still
    #: pickles, deep-copies and writes to Parquet (which stores attrs as JSON) like any other
    ATTRS_KEY = "modal_magic_runs"


class RunExpired(ShortTraceback, ValueError):
    """The run that made a frame is too old (or from another process) for its function to be here."""


# Run ids start with this process's own prefix, so an id from this process that is no longer kept
# (expired) can be told apart from one made by another process (a frame saved and loaded).
_PREFIX = f"run-{os.getpid()}-{os.urandom(4).hex()}-"
_counter = itertools.count(1)
_specs: OrderedDict[str, RunSpec] = OrderedDict()  # full specs, function included: few
_records: OrderedDict[str, RunSpec] = OrderedDict()  # the same without the function: many
_lock = threading.Lock()
_last: dict[str, Any] = {"result": None, "summary": None, "bill": None}


def remember(spec: RunSpec, *, retryable: bool) -> str:
    """Record a finished run and return its new run id.

    ``retryable`` (the run has failed rows): its function is kept too, among the last
    :data:`MAX_RUNS` such runs'. Otherwise only the function-free record is kept.
    """
    with _lock:
        run_id = f"{_PREFIX}{next(_counter)}"
        _records[run_id] = replace(spec, fn=None)
        while len(_records) > MAX_RECORDS:
            _records.popitem(last=False)
        if retryable:
            _specs[run_id] = spec
            while len(_specs) > MAX_RUNS:
                _specs.popitem(last=False)
    return run_id


def spec_for(run_id: Any, name: str = "this column", *, fn: Callable[..., Any] | None = None) -> RunSpec:
    """The spec of ``run_id``; :class:`RunExpired`, saying what to do, when it isn't kept here.

    With ``fn`` (a fixed function for a retry), the run's function-free record is enough: the spec
    comes back with ``fn`` in it.

    Examples
    --------
    >>> spec_for("run-from-elsewhere", "label")
    Traceback (most recent call last):
    ...
    modal_magic.runs.RunExpired: the run that made 'label' happened in another Python process (the frame was saved and loaded), so its function isn't here: run the map again; its cache skips the finished rows
    """
    spec = _specs.get(run_id) if isinstance(run_id, str) else None
    if fn is not None:
        record = spec or (_records.get(run_id) if isinstance(run_id, str) else None)
        if record is not None:
            return replace(record, fn=fn)
    if spec is not None:
        return spec
    if isinstance(run_id, str) and run_id.startswith(_PREFIX):
        raise RunExpired(
            f"the run that made {name!r} is older than the last {MAX_RUNS} runs with failed rows, whose "
            "functions are the only ones kept: run its cell (or map) again; the cache skips the rows "
            "already finished"
        )
    raise RunExpired(
        f"the run that made {name!r} happened in another Python process (the frame was saved and "
        "loaded), so its function isn't here: run the map again; its cache skips the finished rows"
    )


def runs_columns(frame: pd.DataFrame, into: str) -> tuple[str, ...]:
    """The result columns the run that made ``into`` wrote on ``frame`` (empty when it isn't kept)."""
    run_id = frame.attrs.get(RunSpec.ATTRS_KEY, {}).get(into)
    spec = _records.get(run_id) if isinstance(run_id, str) else None
    return spec.result_columns if spec is not None else ()


def last_result() -> pd.DataFrame | None:
    """The DataFrame of the most recent run, including one that was stopped or raised.

    Examples
    --------
    >>> import modal_magic, pandas as pd
    >>> _ = pd.DataFrame({"x": [1, 2]}).modal.map(lambda x: x + 1, column="x", backend="sequential",
    ...                                           progress=False)
    >>> modal_magic.last_result()["result"].tolist()
    [2, 3]
    """
    return _last["result"]


def last_run() -> RunSummary | None:
    """The summary (rows, failures by type, time) of the most recent run.

    For a Modal run, ``compute_usd`` is re-read each time: it includes the keep_warm idle time
    after the run, projected while the containers are still up and exact once they have stopped.
    """
    summary, bill = _last["summary"], _last.get("bill")
    usd = bill() if bill is not None and summary is not None else None
    return summary if usd is None else replace(summary, compute_usd=usd)


def set_last_result(frame: pd.DataFrame | None) -> None:
    """Record the frame :func:`last_result` returns."""
    _last["result"] = frame


def set_last_run(summary: RunSummary, bill: Callable[[], float | None] | None = None) -> None:
    """Record the summary :func:`last_run` returns; ``bill`` gives its compute dollars as they stand
    when :func:`last_run` is called (``None``: the summary's figure is final)."""
    _last["summary"], _last["bill"] = summary, bill


def recorded_run() -> RunSummary | None:
    """The last run's summary as recorded (the same object until the next run records one), its
    compute dollars as they stood when it ended."""
    return _last["summary"]


def amend_last_run(summary: RunSummary) -> None:
    """Replace the last run's summary with an amended copy (its compute dollars still re-read)."""
    _last["summary"] = summary


def runs_error_column(frame: pd.DataFrame, into: str) -> str:
    """The error column of the run that made ``into`` on ``frame`` (``<into>_error`` when not recorded)."""
    run_id = frame.attrs.get(RunSpec.ATTRS_KEY, {}).get(into)
    spec = _records.get(run_id) if isinstance(run_id, str) else None
    return spec.error_column if spec is not None else f"{into}_error"


# --- what a finished run says ------------------------------------------------------------------------

#: what a summary tells the user to type when the run's frame is bound to no name
LAST_RESULT_ERRORS = "modal_magic.last_result().modal.errors()"


@dataclass(frozen=True)
class Wording:
    """How a run's summary names things for its caller: the accessor, or a magic (flags, bound frames)."""

    errors_call: str  # lists the failed rows of the frame the run returns, once bound
    magic: bool  # a magic: a stopped run's frame is bound too, and options are said as flags

    def errors_call_for(self, stopped: bool, raised: bool) -> str:
        """``errors_call``, unless the frame was bound to no name (Stop outside a magic, ``on_error="raise"``).

        Examples
        --------
        >>> words = Wording("scored.modal.errors()", magic=False)
        >>> words.errors_call_for(stopped=False, raised=False), words.errors_call_for(stopped=True, raised=False)
        ('scored.modal.errors()', 'modal_magic.last_result().modal.errors()')
        """
        return self.errors_call if not (raised or (stopped and not self.magic)) else LAST_RESULT_ERRORS

    @property
    def no_cache(self) -> str:
        """How this caller turns the cache off."""
        return "--no-cache" if self.magic else "cache=False"


def summarize(total: int, errors: dict[int, RowError], cancelled: set[int], cached: int, index: pd.Index,
              elapsed_s: float, words: Wording, logs: list[str], *, stopped: bool = False,
              raised: bool = False) -> RunSummary:
    """The one record of a finished run, counted from its outcomes; the bar and ``last_run()`` show it.

    ``errors`` holds every row with an error, ``cancelled`` those of them that never ran. Every row
    is counted once: succeeded, failed, cached or cancelled.

    Examples
    --------
    >>> import pandas as pd
    >>> errors = {1: RowError.create("ValueError", "bad"), 2: RowError.create("Cancelled", "stopped")}
    >>> s = summarize(4, errors, {2}, 1, pd.RangeIndex(4), 2.0, Wording("df.modal.errors()", True), [])
    >>> (s.succeeded, s.failed, s.cached, s.cancelled), s.errors_by_type, s.first_failures
    ((1, 1, 1, 1), {'ValueError': 1}, [('1', 'ValueError: bad')])
    """
    failures = {p: e for p, e in errors.items() if p not in cancelled}
    first = sorted(failures.items())[:5]
    return RunSummary(
        total=total,
        succeeded=total - len(errors) - cached,
        failed=len(failures),
        cached=cached,
        cancelled=len(cancelled),
        elapsed_s=elapsed_s,
        errors_by_type=dict(Counter(e.type_name for e in failures.values()).most_common()),
        first_failures=[(str(index[p]), str(e)) for p, e in first],
        errors_call=words.errors_call_for(stopped, raised),
        no_cache=words.no_cache,
        logs=tuple(logs),
    )


def columns_made(frame: pd.DataFrame, into: str) -> tuple[str, ...]:
    """The columns an earlier run with the same ``into`` wrote on ``frame``: a re-run replaces them.

    The frame's attrs say modal_magic made ``into``; the run's record (when still kept) names every
    column it wrote (``expand=True`` writes one per dict key).

    Examples
    --------
    >>> import pandas as pd
    >>> columns_made(pd.DataFrame({"y": [1]}), "y")
    ()
    """
    if into not in frame.attrs.get(RunSpec.ATTRS_KEY, {}):
        return ()
    return (*(runs_columns(frame, into) or (into,)), runs_error_column(frame, into))
