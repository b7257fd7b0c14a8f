"""Runs in the background: ``wait=False`` returns a :class:`MapJob` at once, and this kernel's job list.

``df.modal.map(fn, column=..., wait=False)`` (the magic's ``--background``) runs the same engine as a
foreground map, in a thread of its own, and returns a :class:`MapJob` as soon as the run's progress
bar is shown in the cell that started it; the bar keeps updating while other cells run (widget
updates are sent from the job's thread). ``job.result()`` waits for the frame, ``job.done()``
says whether it ended, ``job.cancel()`` stops it as the Stop button stops a foreground run (the
finished rows are kept), and ``job.summary`` has the counts so far. Mistakes that a foreground run
reports before any row runs (a missing column, a bad function, no Modal token) are raised by the
call itself, not later by ``result()``. Every backend runs in the background the same way, local
ones included: a second run while the warm local worker pool is busy gets workers of its own.
:func:`jobs` lists this kernel's unfinished jobs, and the Modal runs of earlier kernels whose calls
are still recorded in the cache; :func:`attach` finds one by its id (for an earlier kernel's run, a
job that collects its calls into the cache).
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

from . import control

if TYPE_CHECKING:
    import pandas as pd

    from .backends.modal.reattach import RecordedJob
    from .progress import RunSummary

__all__ = ["MapJob", "attach", "jobs", "start_job", "MAX_FINISHED_JOBS"]

#: finished jobs this kernel still finds with attach(); older ones are forgotten (they hold frames)
MAX_FINISHED_JOBS = 16

_lock = threading.Lock()
_JOBS: OrderedDict[str, MapJob] = OrderedDict()
_numbers = itertools.count(1)


class MapJob:
    """A map running in the background; ``result()`` returns its DataFrame when it ends.

    Made by ``wait=False`` (or ``%%modal_map ... --background``), never directly.

    Examples
    --------
    >>> import modal_magic, pandas as pd
    >>> job = pd.DataFrame({"x": [1, 2, 3]}).modal.map(lambda x: x * 10, column="x", into="y",
    ...                                                backend="threads", progress=False, wait=False)
    >>> job.result()["y"].tolist()
    [10, 20, 30]
    >>> job.done(), job.state, job.summary.succeeded
    (True, 'finished', 3)
    """

    def __init__(self, run: Callable[[], pd.DataFrame], *, title: str) -> None:
        self.id = f"{os.getpid():x}-{next(_numbers)}"
        self.title = title
        self._run = run
        self._control = control.RunControl()
        self._ended = threading.Event()
        self._result: pd.DataFrame | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[MapJob], Any]] | None = []  # None once they have been called
        self._cancelled = False
        context = contextvars.copy_context()  # the cell's context: its output is where the bar shows
        self._thread = threading.Thread(target=context.run, args=(self._main,), daemon=True,
                                        name=f"modal_magic-job-{self.id}")

    # --- running -----------------------------------------------------------------------------------

    def _main(self) -> None:
        with control.running_under(self._control):
            try:
                self._result = self._run()
            except BaseException as error:  # kept for result(); a background thread has nobody else to tell
                self._error = error
            finally:
                self._run = None  # type: ignore[assignment]  # the function and frame are not kept twice
                self._control.shown.set()
        try:  # before result() returns: a --background cell's columns are in place when it does
            with _lock:
                callbacks, self._callbacks = self._callbacks, None
            for callback in callbacks or ():
                callback(self)
        finally:
            self._ended.set()

    def _start(self) -> None:
        self._thread.start()
        self._control.shown.wait()
        if self._control.summary() is None and self._ended.wait() and self._error is not None:
            # The run never began (a user mistake caught before any row): say so here, at the call.
            raise self._error.with_traceback(None)
        _register(self)

    # --- the public handle ---------------------------------------------------------------------------

    def result(self, timeout: float | None = None) -> pd.DataFrame:
        """Wait for the run to end and return its DataFrame, as the foreground call would have.

        Parameters
        ----------
        timeout
            Seconds to wait at most; ``None`` waits until the run ends.

        Raises
        ------
        TimeoutError
            The run is still going after ``timeout`` seconds (it goes on; call again later).
        MapInterrupted
            The job was cancelled: ``.result`` holds the frame with the finished rows.
        Exception
            Whatever the foreground call would have raised (``RowFailed`` with ``on_error="raise"``).

        Examples
        --------
        >>> job = df.modal.map(embed, column="text", backend="modal", wait=False)    # doctest: +SKIP
        >>> out = job.result()                                                         # doctest: +SKIP
        """
        # A done callback runs in the job's thread after the run, before the job counts as ended.
        in_callback = threading.current_thread() is self._thread
        if not in_callback and not self._ended.wait(timeout):
            summary = self.summary
            raise TimeoutError(f"job {self.id} is still running after {timeout:g}s ({summary.succeeded + summary.failed} "
                               f"of {summary.total} rows done); call result() again to keep waiting")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        """True once the run has ended (finished, failed or cancelled) and its columns are filled in."""
        return self._ended.is_set()

    def cancel(self) -> None:
        """Stop the run as the Stop button would: rows in flight are cancelled, finished rows kept.

        Returns at once; ``result()`` then raises ``MapInterrupted`` whose ``.result`` holds the frame.
        Cancelling a job that already ended does nothing.
        """
        if not self._ended.is_set():
            self._cancelled = True
            self._control.stop.set()

    @property
    def summary(self) -> RunSummary:
        """Rows so far: total, succeeded, failed, cached, elapsed seconds (the final summary once done)."""
        from .progress import RunSummary

        summary = self._control.summary()
        return summary if summary is not None else RunSummary(0, 0, 0, 0, 0.0)

    @property
    def state(self) -> str:
        """``"running"``, ``"finished"`` (with or without failed rows), ``"cancelled"`` or ``"failed"``."""
        if not self._ended.is_set():
            return "running"
        if self._error is None:
            return "finished"
        return "cancelled" if self._cancelled else "failed"

    def add_done_callback(self, callback: Callable[[MapJob], Any]) -> None:
        """Call ``callback(job)`` in the job's thread when it ends (at once if it already has)."""
        with _lock:
            if self._callbacks is not None:
                self._callbacks.append(callback)
                return
        callback(self)

    def __repr__(self) -> str:
        s = self.summary
        ran = s.succeeded + s.failed
        parts = [f"{self.state}", f"{ran + s.cached:,}/{s.total:,} rows"]
        if s.failed:
            parts.append(f"{s.failed:,} failed")
        if s.cached:
            parts.append(f"{s.cached:,} cached")
        hint = "job.result() waits for the frame" if not self.done() else "job.result() has the frame"
        return f"<MapJob {self.id} {self.title!r}: {', '.join(parts)}; {hint}>"


def start_job(run: Callable[[], pd.DataFrame], *, title: str) -> MapJob:
    """Start ``run`` (one engine call) in the background; return once its progress bar is shown.

    Examples
    --------
    >>> job = start_job(lambda: __import__("pandas").DataFrame({"a": [1]}), title="a")
    >>> job.result()["a"].tolist()
    [1]
    """
    job = MapJob(run, title=title)
    job._start()
    return job


def _register(job: MapJob) -> None:
    with _lock:
        _JOBS[job.id] = job
        finished = [j for j in _JOBS.values() if j.done()]
        for old in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del _JOBS[old.id]


def jobs() -> list[MapJob | RecordedJob]:
    """Unfinished jobs, oldest first: this kernel's background jobs, then earlier kernels' Modal runs.

    A Modal run's batches are calls recorded in the result cache, so a run whose kernel died (or
    restarted) is listed too, as a ``RecordedJob`` (id, function, rows pending, app ids, age):
    ``attach(its id)`` collects it, and running its cell again picks it up.

    Examples
    --------
    >>> import modal_magic
    >>> [job for job in modal_magic.jobs() if job.done()]
    []
    """
    with _lock:
        here: list[MapJob | RecordedJob] = [job for job in _JOBS.values() if not job.done()]
    return here + _recorded_jobs()


def _recorded_jobs() -> list[RecordedJob]:
    from .backends.modal.reattach import recorded_jobs

    return recorded_jobs()


def attach(job_id: str) -> MapJob:
    """The background job with this id: this kernel's (running, or among its last finished ones), or an
    earlier kernel's Modal run still recorded in the cache.

    Attaching to an earlier kernel's run starts a job that collects its calls (waiting for those
    still running) and stores their rows in the result cache, so running that cell again is served
    from the cache. Its ``result()`` is a frame with one row per collected row: ``key`` (the row's
    cache key), ``result`` and ``error``; calls whose results had expired on Modal have an error, and
    their rows run again when the cell runs again.

    Raises
    ------
    KeyError
        No such job here or in the cache, with the ids this kernel knows.

    Examples
    --------
    >>> job = modal_magic.attach("1f2e-3")                                             # doctest: +SKIP
    >>> out = job.result()                                                             # doctest: +SKIP
    """
    with _lock:
        job = _JOBS.get(job_id)
        known = list(_JOBS)
    if job is not None:
        return job
    recorded = {j.id: j for j in _recorded_jobs()}
    if job_id in recorded:
        return start_job(_collector(recorded[job_id]), title=recorded[job_id].function)
    listed = ", ".join([*known[-8:], *recorded]) if known or recorded else "none"
    raise KeyError(f"no background job {job_id!r} in this kernel or in the cache (jobs known: {listed}); "
                   "modal_magic.jobs() lists the ones still running")


def _collector(recorded: RecordedJob) -> Callable[[], pd.DataFrame]:
    """What an attached earlier run does: collect its calls into the cache, counting rows on the job."""

    def run() -> pd.DataFrame:
        from .backends.modal.reattach import collect_job
        from .progress import Progress, RunSummary

        watching = control.current()
        counts = watching.watch(Progress(), recorded.rows_pending) if watching is not None else Progress()
        started = time.monotonic()
        try:
            frame = collect_job(recorded.id, lambda done, failed: counts.update(done=done, failed=failed))
        except BaseException:
            counts.close("aborted", RunSummary(recorded.rows_pending, 0, 0, 0, 0.0))
            raise
        failed = int(frame["error"].notna().sum())
        counts.close("failed" if failed else "success",
                     RunSummary(len(frame), len(frame) - failed, failed, 0, time.monotonic() - started))
        return frame

    return run
