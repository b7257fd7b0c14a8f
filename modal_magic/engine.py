"""The engine: rows -> batches -> backend -> per-row outcomes -> joined DataFrame.

:func:`map_frame` is the one function every entry point calls. It checks the function and the
columns before any work, turns the selected column(s) into position-keyed arguments, sizes batches
from what it measures as it goes, keeps the backend's slots full, files each outcome under its
row's position as it arrives (completion order never matters), retries lost batches in isolation,
and hands the filled-in results to :mod:`modal_magic.join`. The cache is reached through
:mod:`modal_magic.cache.rows` and the run records through :mod:`modal_magic.runs`: this module is
the loop only. It knows nothing of IPython or display:
progress is fed through :mod:`modal_magic.progress`. How big each batch is comes from
:mod:`modal_magic.batching`, and where each row's outcome is filed from :mod:`modal_magic.outcomes`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import control, join, runs
from .backends import Account, Backend, BackendFailed, Batch, BatchResult, Runtime, Task, create_backend
from .backends.row_runner import backoff_s, run_rows
from .cache.rows import RunCache
from .checks import check_function, check_picklable, default_into
from .costs import billed, container_rate
from .errors import ColumnNotFound, MapInterrupted, RowError, RowFailed
from .options import MapOptions, OptionsError
from .batching import BatchSizer
from .outcomes import Outcomes
from .progress import Progress, make_progress
from .runs import RunSpec

if TYPE_CHECKING:
    from .llm.row.booking import Verdict
    from .spend import MapBudget

__all__ = ["map_frame", "BatchSizer", "check_columns"]

#: how often the engine wakes to refresh progress and notice Ctrl-C, at most
_TICK_S = 0.2
#: remote output lines a run keeps for ``last_run().logs``
MAX_LOG_LINES = 5000
#: the local process backend finishes rows in the kernel's process when they are this cheap (per row,
#: measured on a batch of at least INLINE_AFTER_ROWS) and all that is left would take under
#: INLINE_TOTAL_S: pickling them to workers and back would cost more than running them
INLINE_ROW_S = 2e-6
INLINE_AFTER_ROWS = 512
INLINE_TOTAL_S = 0.25
INLINE_CHUNK = 50_000
#: orders batches waiting to be sent again that are due at the same moment
_TIEBREAK = itertools.count()

def _hands_out_its_objects(column: pd.Series) -> bool:
    """Whether ``tolist()`` gives the objects the column holds, the same ones each call (object
    dtype, Python-backed strings), rather than new ones (numbers, Arrow-backed strings): only then
    can a re-run's rows be recognised by identity (:mod:`~modal_magic.cache.key_memo`)."""
    dtype = column.dtype
    return dtype == object or (isinstance(dtype, pd.StringDtype) and dtype.storage == "python")


def _arguments(frame: pd.DataFrame, columns: list[str], star: bool) -> list[Any]:
    if not star:
        return frame[columns[0]].tolist()
    return list(zip(*(frame[c].tolist() for c in columns)))


def check_columns(frame: pd.DataFrame, columns: Sequence[Any]) -> None:
    """Raise a ``KeyError`` (:class:`ColumnNotFound`) that lists the available columns when one is missing."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        available = ", ".join(map(repr, frame.columns.tolist()))
        raise ColumnNotFound(f"column {missing[0]!r} not found; the DataFrame has: {available}")
    if not frame.columns.is_unique:
        repeated = [c for c in dict.fromkeys(columns) if (frame.columns == c).sum() > 1]
        if repeated:
            raise OptionsError(
                f"the DataFrame has {(frame.columns == repeated[0]).sum()} columns named {repeated[0]!r}, so "
                "which one to use is ambiguous; rename them first, e.g. "
                "df.columns = [f'{c}_{i}' for i, c in enumerate(df.columns)]"
            )


def map_frame(
    frame: pd.DataFrame,
    fn: Callable[..., Any],
    *,
    columns: list[Any],
    star: bool,
    into: str | None,
    options: MapOptions,
    errors_call: str = runs.LAST_RESULT_ERRORS,
    runtime: Runtime | None = None,
    magic: bool = False,
) -> pd.DataFrame:
    """Run ``fn`` once per row of ``frame[columns]`` and return a new frame with result and error columns.

    This is what ``df.modal.map``, ``df.modal.starmap``, ``series.modal.map`` and ``%%modal_map``
    call after parsing their arguments into ``options``. ``runtime`` is what the backend needs
    beyond ``fn`` (a meter, worker processes, a close hook), given by a layer that builds its own
    row function, such as :func:`modal_magic.llm.llm_frame`; a re-run of failed rows gets it again.
    ``errors_call`` is what the user types to list the failed rows of the returned frame (the summary
    shows it); a run that stops or raises names :func:`modal_magic.last_result` instead, since its
    frame is bound to nothing, except in a magic (``magic=True``), which binds a stopped run's frame.
    ``magic`` also makes hints speak in flags (``--no-cache``).

    Examples
    --------
    >>> import pandas as pd
    >>> from modal_magic.options import MapOptions
    >>> df = pd.DataFrame({"x": [1, 2, 3]})
    >>> out = map_frame(df, lambda x: 10 // (x - 2), columns=["x"], star=False, into="y",
    ...                 options=MapOptions.create(backend="sequential", progress=False))
    >>> out["y"].tolist(), out["y_error"].tolist()
    ([-10, <NA>, 10], [None, 'ZeroDivisionError: integer division or modulo by zero', None])
    """
    check_columns(frame, columns)
    what = f"columns={list(columns)!r}" if star else f"column={columns[0]!r}"
    deployed = options.backend.startswith("modal:")
    if deployed:
        if fn is not None:
            raise OptionsError(
                f"backend={options.backend!r} runs that deployed Modal function on each row; "
                "pass None instead of a local function"
            )
        is_async = False
        into = into if into is not None else options.backend.rpartition("/")[2].replace("-", "_")
    else:
        is_async = check_function(fn, len(columns) if star else 1, what=what)
        into = into if into is not None else default_into(fn)
    if not isinstance(into, str) or not into:
        raise OptionsError(f"into={into!r} is not valid: expected a column name (a non-empty string)")
    if options.sample is not None:
        frame = frame.iloc[: options.sample]
    error_column = f"{into}_error"
    planned = [error_column] if options.expand else [into, error_column]
    if options.timings:
        planned.append(join.seconds_column(into))
    clashes = [c for c in join.clashing_columns(frame, planned) if c not in runs.columns_made(frame, into)]
    if clashes and not options.overwrite:
        raise OptionsError(
            f"the DataFrame already has a column {clashes[0]!r}; pass overwrite=True to replace it, "
            "or into='another_name'"
        )
    runtime = runtime if runtime is not None else Runtime()
    task = Task(fn=fn, star=star, is_async=is_async, options=options, runtime=runtime)
    if options.backend == "modal":
        check_picklable(fn, where="Modal")
    elif options.backend == "local" and not is_async:
        check_picklable(fn, where="worker processes")

    args = _arguments(frame, columns, star)
    stored = RunCache.open(task, args, frame if not star and _hands_out_its_objects(frame[columns[0]]) else None) if options.cache is not False and not deployed else None
    spec = RunSpec(fn=fn, columns=tuple(columns), star=star, options=options, error_column=error_column,
                   runtime=runtime)
    words = runs.Wording(errors_call, magic)
    try:
        outcomes = _execute(task, args, frame.index, into, words, stored)
    except _Stopped as stopped:
        outcomes = stopped.outcomes
        out = _join(frame, outcomes, into, spec, stored)
        if stopped.raised is not None:  # on_error="raise": the frame so far is last_result()
            raise stopped.raised
        raise MapInterrupted(
            f"stopped after {outcomes.n - len(outcomes.cancelled):,} of {outcomes.n:,} rows; the finished rows are "
            "kept in modal_magic.last_result() (the rest have a Cancelled error)",
            out,
        ) from None
    return _join(frame, outcomes, into, spec, stored)


def _join(frame: pd.DataFrame, outcomes: Outcomes, into: str, spec: RunSpec, stored: RunCache | None) -> pd.DataFrame:
    options = spec.options
    columns: dict[str, pd.Series] = {}
    if options.expand:
        expanded = join.expand_dicts(outcomes.values, outcomes.errors)
        failed = set(outcomes.errors)
        clashes = [c for c in join.clashing_columns(frame, list(expanded)) if c not in runs.columns_made(frame, into)]
        if clashes and not options.overwrite:
            runs.set_last_result(None)
            raise OptionsError(
                f"expand=True made a column {clashes[0]!r} that the DataFrame already has; "
                "pass overwrite=True to replace it, or rename the dict keys"
            )
        for key, values in expanded.items():
            columns[key] = join.result_series(values, failed, frame.index)
    else:
        columns[into] = join.result_series(outcomes.values, set(outcomes.errors), frame.index)
    result_columns = tuple(columns)
    columns[spec.error_column] = join.error_series(outcomes.errors, outcomes.n, frame.index)
    if outcomes.seconds is not None:
        columns[join.seconds_column(into)] = join.seconds_series(outcomes.seconds, frame.index)
    out = join.attach(frame, columns)
    run_id = runs.remember(dataclasses.replace(spec, result_columns=result_columns), retryable=bool(outcomes.errors))
    out.attrs[RunSpec.ATTRS_KEY] = {**frame.attrs.get(RunSpec.ATTRS_KEY, {}), into: run_id}
    runs.set_last_result(out)
    if stored is not None:  # `df = df.modal.map(...)` re-runs on the frame returned: keep the keys for it too
        stored.keep_keys_with(out)
    return out


class _Stopped(Exception):
    """Internal: Stop was pressed, or a row failed under ``on_error="raise"`` (``raised``); carries
    what finished up to where the frame is built."""

    def __init__(self, outcomes: Outcomes, raised: RowFailed | None = None) -> None:
        self.outcomes = outcomes
        self.raised = raised


def _execute(task: Task, args: list[Any], index: pd.Index, into: str, words: runs.Wording,
             stored: RunCache | None) -> Outcomes:
    n, opts = len(args), task.options
    outcomes = Outcomes(n, expand=task.options.expand, seconds=np.full(n, np.nan) if task.options.timings else None)
    started = time.monotonic()
    run_control = control.current()  # a background run (wait=False): watched and stopped from outside
    logs: list[str] = []
    todo: Sequence[int] = range(n)
    positions, values = stored.hits() if stored is not None else (np.empty(0, dtype=np.intp), [])
    cached_failed = 0
    if len(positions):
        cached_failed = outcomes.file_cached(positions, values)
        missing = np.ones(n, dtype=bool)
        missing[positions] = False
        todo = np.flatnonzero(missing)

    def show() -> Progress:
        bar = make_progress(task.options.progress, n, title=into)
        if run_control is not None:
            bar = run_control.watch(bar, n)
        if len(positions):
            bar.update(cached=outcomes.cached, failed=cached_failed)
        return bar

    if len(todo) == 0:
        _finish(show(), "success", outcomes, index, started, words, logs)
        return outcomes
    progress = Progress()  # no bar until the backend has started: a set-up error shows none
    backend = create_backend(task)
    try:
        backend.start(task)
        progress = show()
        _drive(backend, task, args, todo, outcomes, progress, index, logs, stored,
               run_control.stop if run_control is not None else None)
    except KeyboardInterrupt:
        if run_control is not None and run_control.stop.is_set():  # job.cancel(): what was submitted goes too
            backend.cancel_submitted()
        backend.cancel()
        outcomes.cancel_unfinished("the run was stopped before this row finished")
        _finish(progress, "aborted", outcomes, index, started, words, logs, stopped=True)
        raise _Stopped(outcomes) from None
    except RowFailed as failed:
        backend.cancel()
        outcomes.cancel_unfinished("on_error='raise' stopped the run at a failed row before this row finished")
        _finish(progress, "aborted", outcomes, index, started, words, logs, raised=True)
        raise _Stopped(outcomes, failed) from None
    except BackendFailed as failure:  # the rows still out fail with it; none is dropped
        backend.cancel()
        lost = outcomes.unfinished()
        for position in lost:
            outcomes.fail(position, RowError.from_exception(failure))
        progress.update(failed=len(lost))
        _finish(progress, "aborted", outcomes, index, started, words, logs)
        return outcomes
    finally:
        if stored is not None:  # what finished is kept, however the run ended
            stored.flush()
            stored.report()
        backend.finish()
    bill = None
    if outcomes.compute_usd is not None:  # its containers' time, the keep_warm idle tail projected while they're up
        bill = billed(container_rate(opts.gpu, cpu=opts.cpu, memory=opts.memory), backend.container_seconds)
        usd = bill()
        outcomes.compute_usd = usd if usd is not None else outcomes.compute_usd
    _finish(progress, "failed" if outcomes.errors else "success", outcomes, index, started, words, logs, bill=bill)
    return outcomes


def _finish(progress: Progress, state: str, outcomes: Outcomes, index: pd.Index, started: float,
            words: runs.Wording, logs: list[str], *, stopped: bool = False, raised: bool = False,
            bill: Callable[[], float | None] | None = None) -> None:
    """Count the run once, from its outcomes: the bar's summary and ``last_run()`` are this one record."""
    summary = runs.summarize(outcomes.n, outcomes.errors, outcomes.cancelled, outcomes.cached, index,
                             time.monotonic() - started, words, logs, stopped=stopped, raised=raised)
    if outcomes.compute_usd is not None:
        summary = dataclasses.replace(summary, compute_usd=outcomes.compute_usd)
    runs.set_last_run(summary, bill=bill)  # last_run() re-reads the bill: exact once the containers stopped
    progress.close(state, summary)  # type: ignore[arg-type]


def _drive(backend: Backend, task: Task, args: list[Any], todo: Sequence[int], outcomes: Outcomes,
           progress: Progress, index: pd.Index, logs: list[str], stored: RunCache | None,
           stop: threading.Event | None = None) -> None:
    opts = task.options
    adopted = backend.reattach(todo, stored) if stored is not None else []
    if adopted:  # rows an earlier run (maybe another kernel) already submitted: collected, not sent again
        taken = np.concatenate([np.asarray(batch.positions, dtype=np.intp) for batch in adopted])
        todo = np.setdiff1d(np.asarray(todo, dtype=np.intp), taken)
    n = len(todo)
    # A run may have a meter (``.tokens``, ``.cost_usd``) that the bar shows as it runs; it sees
    # every batch that comes back (an LLM run on Modal adds up the rows' usage from them).
    meter = task.runtime.meter
    single = backend.timeout_needs_single_rows and opts.timeout is not None
    sizer = BatchSizer(
        backend.parallelism,
        opts.batch_size or (1 if single else None),
        target_s=backend.target_batch_s,
        initial=backend.initial_batch_rows(n),
        max_size=backend.max_batch_rows(args),
    )
    cursor = 0
    next_id = 0
    in_flight = len(adopted)
    retry_at: list[tuple[float, int, Batch]] = []  # lost rows waiting out their backoff
    budget: MapBudget | None = None
    if opts.backend == "modal":  # container time has a known rate: count its dollars, capped by budget_usd
        from .spend import MapBudget  # here: it shares the LLM package's booking, and that package imports us

        budget = MapBudget(opts)  # with budget_usd each batch books its worst case before it is sent
        outcomes.compute_usd = 0.0
    # Every cap on what the run spends, each booked batch by batch: the compute budget, and the one
    # the layer that made the function keeps (an LLM run's budget_usd on Modal).
    accounts: list[Account] = [budget] if budget is not None else []
    extra = task.runtime.account(opts) if task.runtime.account is not None else None
    if extra is not None:
        accounts.append(extra)
    held: Batch | None = None  # a batch (or the rest of one) waiting its turn, first in line, so it fits the budget

    while cursor < n or in_flight or retry_at or held is not None:
        if stop is not None and stop.is_set():  # MapJob.cancel(): stop as the Stop button does
            raise KeyboardInterrupt
        starting: list[Batch] = []
        while in_flight < backend.capacity:
            if held is not None:
                batch, held = held, None
            elif retry_at and retry_at[0][0] <= time.monotonic():
                batch = heapq.heappop(retry_at)[2]
            elif (cursor < n and backend.inline_when_tiny and opts.batch_size is None
                  and _parallel_cannot_pay(sizer, n - cursor)):
                _run_inline(task, args, todo[cursor:], outcomes, progress, index, stored)
                cursor = n
                continue  # nothing to submit: the rows ran here (and `batch` is the last one sent)
            elif cursor < n:
                size = min(sizer.next_size(n - cursor), n - cursor)
                positions = _as_range(todo[cursor : cursor + size])
                if isinstance(positions, range):
                    batch = Batch(0, positions, args[positions.start : positions.stop])
                else:
                    batch = Batch(0, positions, [args[p] for p in positions])
                cursor += size
            else:
                break
            if accounts:
                verdict, fits, refusing = _admit(accounts, batch)
                if verdict == "wait":
                    held = batch
                    break
                if verdict == "refuse":
                    _refuse_unsent(refusing, batch, todo[cursor:], retry_at, outcomes, progress)
                    cursor = n
                    break
                if fits < len(batch.positions):  # what doesn't fit yet goes first next time
                    batch, held = _split(batch, fits)
            batch.id = next_id
            next_id += 1
            for account in accounts:
                batch = account.book(batch)
            starting.append(batch)
            in_flight += 1
        if starting:
            backend.submit_many(starting)
        wait = _TICK_S
        if retry_at:
            wait = max(0.0, min(wait, retry_at[0][0] - time.monotonic()))
        if not in_flight:
            time.sleep(wait)  # only lost rows waiting out their backoff are left
            continue
        results = backend.results(wait)
        _relay_backend_news(backend, progress, logs)
        for result in results:
            in_flight -= 1
            for account in accounts:
                account.settle(result)
            if budget is not None:
                outcomes.compute_usd = budget.cost_usd(backend.container_seconds())
                if backend.status() is None:  # live dollars on the bar, where the backend has nothing to say
                    progress.update(status=budget.status(outcomes.compute_usd))
            if result.requeue:
                heapq.heappush(retry_at, (time.monotonic(), next(_TIEBREAK), result.batch))
                continue
            if result.lost is not None:
                _requeue_lost(result, task, outcomes, retry_at, progress, index)
                continue
            sizer.observe(len(result.batch.positions), result.elapsed_s)
            failed = outcomes.file(result.batch.positions, result.values, result.errors)
            outcomes.time(result.batch.positions, result.row_seconds)
            usage = {}
            if meter is not None:
                meter.observe(result.values, result.errors)
                usage = {"tokens": meter.tokens, "cost_usd": meter.cost_usd}
            if stored is not None:  # as they arrive: a crash or Stop loses at most the rows in flight
                stored.save(result.batch.positions, result.values, failed, result.elapsed_s)
            progress.update(done=len(result.batch.positions) - len(failed), failed=len(failed), **usage)
            if failed:
                _raise_if_asked(failed, task, outcomes, index)


def _admit(accounts: list[Account], batch: Batch) -> tuple[Verdict, int, Account | None]:
    """Whether ``batch`` may go now, and how many of its first rows: the fewest any account has room for.

    Returns ``(verdict, rows, account)``: ``"book"`` with the rows every account can take (at least
    one; fewer rows never cost more), else the first account's ``"wait"`` or ``"refuse"``, and which.
    """
    rows = len(batch.positions)
    for account in accounts:
        verdict, fits = account.admit(batch)
        if verdict != "book":
            return verdict, 0, account
        rows = min(rows, fits)
    return "book", rows, None


def _split(batch: Batch, rows: int) -> tuple[Batch, Batch]:
    """``batch``'s first ``rows`` rows, and the rest, as two batches of the same attempt."""
    head = dataclasses.replace(batch, positions=batch.positions[:rows], args=batch.args[:rows])
    rest = dataclasses.replace(batch, positions=batch.positions[rows:], args=batch.args[rows:])
    return head, rest


def _refuse_unsent(account: Account | None, batch: Batch, rest: Sequence[int], retry_at: list, outcomes: Outcomes,
                   progress: Progress) -> None:
    """An account can't take ``batch``: it, the rows not yet batched and those waiting to retry fail unsent."""
    assert account is not None
    waiting = [p for _, _, b in retry_at for p in b.positions]
    retry_at.clear()
    unsent = [*batch.positions, *rest, *waiting]
    error = RowError.from_exception(account.refusal(batch, len(unsent)))
    for position in unsent:
        outcomes.fail(int(position), error)
    progress.update(failed=len(unsent), retrying=0)


def _as_range(positions: Sequence[int]) -> Sequence[int]:
    """Consecutive positions as a ``range``, which files, slices and stores without a per-row loop."""
    if isinstance(positions, range) or len(positions) == 0:
        return positions
    first, last = int(positions[0]), int(positions[-1])
    if last - first == len(positions) - 1:
        return range(first, last + 1)
    return [int(p) for p in positions]


def _parallel_cannot_pay(sizer: BatchSizer, remaining: int) -> bool:
    """Rows so cheap that shipping them to workers costs more than running them here.

    Judged on a batch big enough to trust (the first one-row batches carry start-up costs).
    """
    return (
        sizer.per_row_s is not None
        and sizer.largest_measured >= INLINE_AFTER_ROWS
        and sizer.per_row_s < INLINE_ROW_S
        and remaining * sizer.per_row_s < INLINE_TOTAL_S
    )


def _run_inline(task: Task, args: list[Any], positions: Sequence[int], outcomes: Outcomes, progress: Progress,
                index: pd.Index, stored: RunCache | None) -> None:
    """Run the remaining rows in this thread, in chunks so the bar moves and Stop is noticed."""
    opts = task.options
    for start in range(0, len(positions), INLINE_CHUNK):
        chunk = _as_range(positions[start : start + INLINE_CHUNK])
        chunk_args = (args[chunk.start : chunk.stop] if isinstance(chunk, range) else [args[p] for p in chunk])
        began = time.perf_counter()
        seconds: list[float] | None = [] if opts.timings else None
        values, errors = run_rows(task.fn, task.star, chunk_args, opts.retries, opts.timeout, seconds)
        failed = outcomes.file(chunk, values, errors)
        outcomes.time(chunk, seconds)
        if stored is not None:
            stored.save(chunk, values, failed, time.perf_counter() - began)
        progress.update(done=len(chunk) - len(failed), failed=len(failed))
        if failed:
            _raise_if_asked(failed, task, outcomes, index)


def _relay_backend_news(backend: Backend, progress: Progress, logs: list[str]) -> None:
    lines = backend.drain_logs()
    if lines:
        logs.extend(lines)
        del logs[:-MAX_LOG_LINES]
        progress.log(lines)
    containers = backend.containers()
    if containers is not None:
        progress.update(containers=containers)
    status = backend.status()
    if status is not None:
        progress.update(status=status)


def _raise_if_asked(failed: list[int], task: Task, outcomes: Outcomes, index: pd.Index) -> None:
    if task.options.on_error == "raise":
        position = min(failed)
        error = outcomes.errors[position]
        raise RowFailed(index[position], position, error) from error.exception


def _requeue_lost(result: BatchResult, task: Task, outcomes: Outcomes, retry_at: list, progress: Progress, index: pd.Index) -> None:
    """A batch never came back: split it so each row gets an isolated try; give up on a row after its tries."""
    batch, cause = result.batch, result.lost
    assert cause is not None
    allowed = batch.max_attempts or 1 + task.options.retries
    now = time.monotonic()
    if len(batch.positions) > 1 or (result.lost_with_others and batch.attempt == 1):
        # One row may have taken the whole batch (or its neighbours) down: every row gets a try of its own first.
        for position, arg in zip(batch.positions, batch.args):
            single = Batch(0, [position], [arg], attempt=batch.attempt + 1, max_attempts=max(allowed, batch.attempt) + 1)
            heapq.heappush(retry_at, (now, next(_TIEBREAK), single))
    elif batch.attempt < allowed:
        again = Batch(0, batch.positions, batch.args, attempt=batch.attempt + 1, max_attempts=allowed)
        heapq.heappush(retry_at, (now + backoff_s(batch.attempt), next(_TIEBREAK), again))
    else:
        position = batch.positions[0]
        outcomes.fail(position, RowError.from_exception(cause, attempts=batch.attempt))
        progress.update(failed=1, retrying=len(retry_at))
        _raise_if_asked([position], task, outcomes, index)
        return
    progress.update(retrying=len(retry_at))


