"""The reference backend: every row in the calling thread, one batch at a time.

It defines correct behaviour for the tests (every other backend must produce the same frame) and
is the simplest way to debug a function: breakpoints and prints work as in a plain loop.
"""

from __future__ import annotations

import time
from collections import deque

from .row_runner import run_rows
from .base import Backend, Batch, BatchResult, Task


class SequentialBackend(Backend):
    """Runs each batch inline when results are asked for."""

    name = "sequential"

    def __init__(self) -> None:
        self._pending: deque[Batch] = deque()
        self._task: Task | None = None

    def start(self, task: Task) -> None:
        if task.is_async:
            raise ValueError("async functions run on their own event loop; the engine picks that backend")
        self._task = task

    @property
    def capacity(self) -> int:
        return 1

    def submit(self, batch: Batch) -> None:
        self._pending.append(batch)

    def results(self, timeout: float | None) -> list[BatchResult]:
        if not self._pending:
            return []
        assert self._task is not None
        batch = self._pending.popleft()
        opts = self._task.options
        started = time.perf_counter()
        seconds: list[float] | None = [] if opts.timings else None
        values, errors = run_rows(self._task.fn, self._task.star, batch.args, opts.retries, opts.timeout, seconds)
        return [BatchResult(batch, values, errors, time.perf_counter() - started, row_seconds=seconds)]

    def cancel(self) -> None:
        self._pending.clear()
