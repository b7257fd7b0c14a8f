"""Container time as Modal bills it, from each container's start to its scale-down, split among the runs.

Modal streams every container's state to the client that holds its app (``TaskLogs.task_state`` in
the app's log stream, which reaches ``OutputManager.update_task_state``). A :class:`ContainerClock`
per warm session turns those states into lifetimes: a container is billed from the first state
that means it has a worker (assigned, creating, loading its image: the cold start counts) until it
is reported completed or preempted, or until its session stops the app.

Who pays for a second of a container that several cells share? The rule, documented in the README:

- a second goes to the run(s) using the session at that moment; runs that overlap split it evenly;
- the idle tail after a run (``keep_warm``: Modal keeps the containers up, and bills them, until
  they have been idle that long) goes to the run that finished last, until another run starts
  using the session or its containers stop. While they are still up, a finished run's figure is
  *projected*: each live container billed until the run's end + ``keep_warm``; once they have
  stopped it is exact.

Times are the client's clock when each state arrived (``time.monotonic()``), so the figure is an
estimate, within the log stream's latency of Modal's own count.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable

__all__ = ["ContainerClock"]

# TaskState values (modal_proto.api_pb2), spelt out so this module doesn't import the client
_QUEUED_STATES = {0, 1, 6}  # UNSPECIFIED, QUEUED, CREATED: no worker yet, nothing billed
_STOPPED_STATES = {5, 10}  # COMPLETED, PREEMPTED


class ContainerClock:
    """The lifetimes of one warm session's containers and which runs used the session when.

    ``now`` is injectable so tests can use fake time.

    Examples
    --------
    >>> t = [0.0]
    >>> clock = ContainerClock(keep_warm=60, now=lambda: t[0])
    >>> clock.begin("a"); clock.task_state("ta-1", 3)    # run a starts, a container loads
    >>> t[0] = 10.0; clock.end("a")                       # a ends after 10 s
    >>> clock.run_seconds("a")                            # projected: 10 s + 60 s idle before scale-down
    70.0
    >>> t[0] = 40.0; clock.task_state("ta-1", 5)          # the container stopped early, at 40 s
    >>> clock.run_seconds("a"), clock.total_seconds()
    (40.0, 40.0)
    """

    def __init__(self, keep_warm: float, now: Callable[[], float] = time.monotonic) -> None:
        self.keep_warm = keep_warm
        self._now = now
        self._lock = threading.Lock()
        self._spans: dict[str, list[float | None]] = {}  # task id -> [start, stop or None]
        self._stopped: set[str] = set()  # tasks reported stopped (a late state must not restart them)
        # who pays from each moment on: (time, runs); runs is never empty after the first begin()
        self._owners: list[tuple[float, tuple[Hashable, ...]]] = []
        self._active: list[Hashable] = []
        self._tail_from: float | None = None  # when the last run ended (its keep_warm tail began)
        self._closed_at: float | None = None

    # --- what happens ---------------------------------------------------------------------------
    def task_state(self, task_id: str, state: int) -> None:
        """A container's state arrived from Modal's log stream."""
        with self._lock:
            t = self._now()
            if task_id in self._stopped or state in _QUEUED_STATES or self._closed_at is not None:
                return
            if state in _STOPPED_STATES:
                self._stopped.add(task_id)
                span = self._spans.get(task_id)
                if span is not None:
                    span[1] = t
                return
            self._spans.setdefault(task_id, [t, None])

    def begin(self, run: Hashable) -> None:
        """``run`` starts using the session (the previous run's idle tail, if any, ends here)."""
        with self._lock:
            self._active.append(run)
            self._tail_from = None
            self._owners.append((self._now(), tuple(self._active)))

    def end(self, run: Hashable) -> None:
        """``run`` is done with the session; if it was the last one, the idle tail is its to pay."""
        with self._lock:
            if run in self._active:
                self._active.remove(run)
            t = self._now()
            if self._active:
                self._owners.append((t, tuple(self._active)))
            else:
                self._tail_from = t  # the owners stay (run,): the idle tail is the finishing run's

    def close(self) -> None:
        """The app stopped: every container still up stops now."""
        with self._lock:
            if self._closed_at is not None:
                return
            t = self._closed_at = self._now()
            for span in self._spans.values():
                if span[1] is None:
                    span[1] = t

    # --- what it costs ----------------------------------------------------------------------------
    @property
    def containers_seen(self) -> int:
        """How many containers have reported a start (none: the client streamed no task states)."""
        return len(self._spans)

    def total_seconds(self) -> float:
        """Container-seconds of the whole session so far, idle ones included (not projected)."""
        with self._lock:
            horizon = self._horizon()
            return sum((span[1] if span[1] is not None else horizon) - span[0] for span in self._spans.values())

    def run_seconds(self, run: Hashable) -> float:
        """Container-seconds billed to ``run`` under the rule above: so far while it runs, with its
        idle tail projected to ``keep_warm`` once it has ended and the containers are still up."""
        with self._lock:
            horizon = self._horizon()
            if self._owners and run in self._owners[-1][1] and not self._active and self._closed_at is None:
                assert self._tail_from is not None
                horizon = max(horizon, self._tail_from + self.keep_warm)  # projected scale-down
            segments = [(t, self._owners[i + 1][0] if i + 1 < len(self._owners) else horizon, runs)
                        for i, (t, runs) in enumerate(self._owners) if run in runs]
            total = 0.0
            for start, stop in self._spans.values():
                stop = stop if stop is not None else horizon
                for seg_start, seg_stop, runs in segments:
                    overlap = min(stop, seg_stop) - max(start, seg_start)
                    if overlap > 0:
                        total += overlap / len(runs)
            return total

    def _horizon(self) -> float:
        return self._closed_at if self._closed_at is not None else self._now()
