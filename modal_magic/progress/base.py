"""The progress interface (:class:`Progress`, which shows nothing) and the counting every live bar shares.

The engine feeds a display outcome counts with ``update(done=, failed=, cached=)`` (increments) and
gauges (``retrying``, ``containers``, ``tokens``, ``cost_usd``: absolute values, shown once set),
and ends it with ``close(state, summary)``. :class:`_LiveProgress` keeps the counts and throttles
redraws like tqdm's ``update()``: it checks a row counter before the clock and draws at most every
``mininterval`` seconds, so updating once per row costs about a tenth of a microsecond.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from .summary import RunSummary, State, format_duration, format_rate, usage_text

__all__ = ["Progress"]


class Progress:
    """No display at all (``progress=False``); the interface every display implements.

    Examples
    --------
    >>> bar = Progress()
    >>> bar.update(done=1)
    >>> bar.close("success", RunSummary(total=1, succeeded=1, failed=0, cached=0, elapsed_s=0.1))
    """

    def update(self, *, done: int = 0, failed: int = 0, cached: int = 0,
               retrying: int | None = None, containers: int | None = None,
               tokens: int | None = None, cost_usd: float | None = None, status: str | None = None) -> None:
        """Count finished rows and set the gauges.

        Parameters
        ----------
        done, failed, cached : int
            Rows that succeeded, failed, or came from the cache since the last call.
        retrying, containers, tokens, cost_usd : optional
            Absolute values; ``None`` leaves the shown value as it was. ``containers``,
            ``tokens`` and ``cost_usd`` are shown only once they have been set.
        status : str, optional
            What the rows wait for (an OpenAI batch's state and request counts), shown first once set.

        Examples
        --------
        >>> Progress().update(done=3, failed=1, containers=4)
        """

    def log(self, lines: list[str]) -> None:
        """Output from where the rows run (Modal's image builds and container logs).

        The widget keeps it collapsed under the bar; the text bar doesn't print it (a log would
        drown in it), and ``modal_magic.last_run().logs`` keeps it either way.

        Examples
        --------
        >>> Progress().log(["Building image im-123"])
        """

    def close(self, state: State, summary: RunSummary) -> None:
        """Draw the final state and the run's summary; later calls do nothing.

        Parameters
        ----------
        state : {"success", "failed", "aborted"}
            How the run ended: every row succeeded, some rows failed, or it was stopped.
        summary : RunSummary
            Totals, failures by type and the first failed rows.

        Examples
        --------
        >>> Progress().close("aborted", RunSummary(4, 1, 0, 0, 2.0))
        """

class _LiveProgress(Progress):
    """Counts, throttling and the counts text shared by the widget and the text bar.

    Subclasses implement ``_draw(now, final)`` and ``_show_summary(state, summary)``.
    Not thread-safe: feed it from one thread (the engine's consumer loop does).
    """

    #: Seconds between redraws, at most.
    mininterval = 0.1
    #: Rows counted between two readings of the clock, at most.
    maxminiters = 100

    def __init__(self, total: int, *, title: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.title = title
        self.done = self.failed = self.cached = self.retrying = 0
        self.containers: int | None = None
        self.status: str | None = None
        self.tokens: int | None = None
        self.cost_usd: float | None = None
        self._clock = clock
        self._closed = False
        # Rows counted since the clock was last read, and how many to count before reading it
        # again (tqdm's miniters): the cheap integer check that keeps the clock out of most updates.
        self._pending = 0
        self._miniters = 1
        self._start = self._last_draw_t = clock()
        self._last_draw_n = 0

    @property
    def n(self) -> int:
        """Rows finished so far: done, failed or cached."""
        return self.done + self.failed + self.cached

    def update(self, *, done: int = 0, failed: int = 0, cached: int = 0,
               retrying: int | None = None, containers: int | None = None,
               tokens: int | None = None, cost_usd: float | None = None, status: str | None = None) -> None:
        pending = self._pending + done
        self.done += done
        if failed or cached:  # rare next to done; skipping them is a quarter of this call's cost
            self.failed += failed
            self.cached += cached
            pending += failed + cached
        if status is not None and status != self.status:
            self.status = status
            pending += self._miniters
        if (retrying is not None or containers is not None
                or tokens is not None or cost_usd is not None):
            if self._set_gauges(retrying, containers, tokens, cost_usd):
                pending += self._miniters  # a moved gauge is worth a look at the clock
        if pending < self._miniters:
            self._pending = pending
            return
        self._pending = 0
        now = self._clock()
        self._adapt_miniters(now)
        if now - self._last_draw_t >= self.mininterval and not self._closed:
            self._last_draw_t, self._last_draw_n = now, self.n
            self._draw(now, final=False)

    def _set_gauges(self, retrying: int | None, containers: int | None,
                    tokens: int | None, cost_usd: float | None) -> bool:
        moved = False
        if retrying is not None and retrying != self.retrying:
            self.retrying, moved = retrying, True
        if containers is not None and containers != self.containers:
            self.containers, moved = containers, True
        if tokens is not None and tokens != self.tokens:
            self.tokens, moved = tokens, True
        if cost_usd is not None and cost_usd != self.cost_usd:
            self.cost_usd, moved = cost_usd, True
        return moved

    def _adapt_miniters(self, now: float) -> None:
        # Read the clock about ten times per redraw interval at the rate since the last redraw,
        # growing at most twofold per reading (a burst of rows, or a clock too coarse to have
        # moved, is no rate) and never past `maxminiters`: when rows slow down, the bar can sit
        # on stale numbers for at most that many rows. 100 already makes the clock's share of
        # an update a few nanoseconds.
        dt = now - self._last_draw_t
        target = (int((self.n - self._last_draw_n) * self.mininterval / (10 * dt)) if dt > 0
                  else self.maxminiters)
        self._miniters = max(1, min(2 * self._miniters, target, self.maxminiters))

    def close(self, state: State, summary: RunSummary) -> None:
        if self._closed:
            return
        self._closed = True
        now = self._clock()
        self._start = now - summary.elapsed_s  # the final line and the summary tell the same time
        # ... and the same counts: a Stop can land between a batch being counted and shown
        self.done, self.failed, self.cached, self.retrying = summary.succeeded, summary.failed, summary.cached, 0
        self._draw(now, final=True)
        self._show_summary(state, summary)

    def _counts_text(self, now: float, *, final: bool = False) -> str:
        """The live line: rows, counts, gauges, rate, elapsed and (while running) ETA."""
        elapsed = max(now - self._start, 0.0)
        computed = self.done + self.failed
        rate = computed / elapsed if elapsed > 0 else None
        parts = [self.status] if self.status else []
        parts += [f"{self.n:,}/{self.total:,} rows",
                 f"{self.done:,} done, {self.failed:,} failed, {self.cached:,} cached, "
                 f"{self.retrying:,} retrying"]
        if self.containers is not None:
            parts.append(f"{self.containers:,} containers")
        usage = usage_text(self.tokens, self.cost_usd)
        if usage:
            parts.append(usage)
        parts.append(f"{format_rate(rate)} rows/s")
        timing = f"{format_duration(elapsed)} elapsed"
        if not final:
            remaining = max(self.total - self.n, 0)
            eta = 0.0 if remaining == 0 else (remaining / rate if rate else None)
            timing += f", ETA {format_duration(eta)}"
        parts.append(timing)
        return " | ".join(parts)

    def _summary(self, summary: RunSummary) -> RunSummary:
        """``summary`` with the run's last token and cost gauges filled in where it has none."""
        if summary.tokens is None and self.tokens is not None:
            summary = replace(summary, tokens=self.tokens)
        if summary.cost_usd is None and self.cost_usd is not None:
            summary = replace(summary, cost_usd=self.cost_usd)
        return summary

    def _draw(self, now: float, *, final: bool) -> None:
        raise NotImplementedError

    def _show_summary(self, state: State, summary: RunSummary) -> None:
        raise NotImplementedError
