"""How a run started in the background is watched and stopped from outside the thread that runs it.

A background run (``wait=False``, see :mod:`modal_magic.jobs`) executes the engine in a thread of
its own, inside a :class:`RunControl` made current for that thread with :func:`running_under`. The
engine asks :func:`current` once per run: when there is a control, it hands the run's progress
display to :meth:`RunControl.watch` (which counts what the display is told and signals that the
display exists, so the cell that started the run returns only after the bar is shown in it) and
checks :attr:`RunControl.stop` on every tick, stopping as Stop/Ctrl-C would. A foreground run has
no control and pays nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Any, Iterator

from .progress import Progress, RunSummary, State

__all__ = ["RunControl", "current", "running_under"]

_CURRENT: contextvars.ContextVar[RunControl | None] = contextvars.ContextVar("modal_magic_run_control",
                                                                             default=None)


class _Counting(Progress):
    """Passes everything on to the real display and keeps the counts, for ``MapJob.summary``."""

    def __init__(self, inner: Progress, total: int) -> None:
        self.inner = inner
        self.total = total
        self.done = self.failed = self.cached = 0
        self.started = time.monotonic()
        self.final: RunSummary | None = None
        self.state: State | None = None

    def update(self, *, done: int = 0, failed: int = 0, cached: int = 0, **gauges: Any) -> None:
        self.done += done
        self.failed += failed
        self.cached += cached
        self.inner.update(done=done, failed=failed, cached=cached, **gauges)  # the gauges Progress.update takes

    def log(self, lines: list[str]) -> None:
        self.inner.log(lines)

    def close(self, state: State, summary: RunSummary) -> None:
        self.final, self.state = summary, state
        self.inner.close(state, summary)

    def summary(self) -> RunSummary:
        if self.final is not None:
            return self.final
        return RunSummary(total=self.total, succeeded=self.done, failed=self.failed, cached=self.cached,
                          elapsed_s=time.monotonic() - self.started)


class RunControl:
    """The handle a background run is driven through: a stop flag and what its display has counted.

    Examples
    --------
    >>> control = RunControl()
    >>> with running_under(control):
    ...     current() is control
    True
    >>> current() is None
    True
    """

    def __init__(self) -> None:
        #: set by ``MapJob.cancel()``; the engine stops at its next tick, as Stop would stop it
        self.stop = threading.Event()
        #: set once the run's display exists (or the run ended before it had one)
        self.shown = threading.Event()
        self._counts: _Counting | None = None

    def watch(self, progress: Progress, total: int) -> Progress:
        """Wrap the run's display so its counts can be read while it runs; signal that it exists."""
        self._counts = _Counting(progress, total)
        self.shown.set()
        return self._counts

    def summary(self) -> RunSummary | None:
        """The counts so far (the final summary once the run ended), or ``None`` before the run began."""
        return self._counts.summary() if self._counts is not None else None

    @property
    def state(self) -> State | None:
        """How the run ended (``"success"``, ``"failed"`` or ``"aborted"``), ``None`` while it runs."""
        return self._counts.state if self._counts is not None else None


def current() -> RunControl | None:
    """The control of the run this thread executes in the background, or ``None`` in the foreground."""
    return _CURRENT.get()


@contextlib.contextmanager
def running_under(control: RunControl) -> Iterator[Any]:
    """Make ``control`` current for the runs started inside the ``with`` block (this thread only)."""
    token = _CURRENT.set(control)
    try:
        yield control
    finally:
        _CURRENT.reset(token)
