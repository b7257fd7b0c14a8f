"""Threads for I/O-bound functions (HTTP calls, file reads): ``max_containers`` threads in this process.

Threads start as batches need them, up to ``max_containers`` (default: the core count) and at most
:data:`~modal_magic.options.MAX_THREADS` (a larger ``max_containers`` is capped with a one-time
warning: past a few hundred threads, switching and memory cost more than the extra concurrency
gives; use an ``async def`` function for thousands of requests in flight).

Threads share the kernel's memory, so nothing is pickled and notebook objects just work. A thread
can't be killed, so a row over ``timeout`` is reported as a ``TimeoutError`` at once and its thread
is abandoned (its late result is dropped) while a fresh thread takes its place.
"""

from __future__ import annotations

import queue
import threading
import time

from ..options import MAX_THREADS
from .base import Backend, Batch, BatchResult, Task, capped_concurrency, drain
from .row_runner import run_rows


class RowThread:
    """One thread of a run, taking batches from the run's inbox until told to stop or abandoned."""

    def __init__(self, backend: ThreadBackend) -> None:
        self.backend = backend
        self.batch: Batch | None = None
        self.started = 0.0
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="modal_magic-thread", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        backend = self.backend
        while True:
            batch = backend._inbox.get()
            if batch is None:
                return
            task = backend._task
            assert task is not None
            self.batch, self.started = batch, time.monotonic()
            # With a timeout each batch is one row, timed by the monitor in results(); retries of a
            # row that timed out are the engine's, so the in-thread loop only retries exceptions.
            opts = task.options
            try:
                seconds: list[float] | None = [] if opts.timings else None
                values, errors = run_rows(task.fn, task.star, batch.args, opts.retries, seconds=seconds)
                result = BatchResult(batch, values, errors, time.monotonic() - self.started, row_seconds=seconds)
            except BaseException as e:  # the row loop itself broke: the batch is lost, never silently dropped
                result = BatchResult(batch, lost=e)
            with backend._lock:
                self.batch = None
                if self.abandoned or backend._cancelled:
                    return
                backend._outbox.put(result)


class ThreadBackend(Backend):
    """``max_containers`` threads pulling batches from a queue."""

    name = "threads"
    timeout_needs_single_rows = True

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[RowThread] = []
        self._task: Task | None = None
        self._cancelled = False

    def start(self, task: Task) -> None:
        self._task = task
        self._size = capped_concurrency(task.options.local_concurrency(), MAX_THREADS, "threads",
                                        f"{MAX_THREADS} at most; an async def function suits more requests in flight")

    @property
    def capacity(self) -> int:
        return self._size

    def submit(self, batch: Batch) -> None:
        with self._lock:
            live = sum(not w.abandoned for w in self._threads)
            if live < self._size:
                self._threads.append(RowThread(self))
        self._inbox.put(batch)

    def results(self, timeout: float | None) -> list[BatchResult]:
        limit = self._task.options.timeout if self._task else None
        wait = timeout if limit is None else min(timeout if timeout is not None else limit, 0.05)
        out = drain(self._outbox, wait)
        if limit is not None:
            out.extend(self._expire(limit))
        return out

    def _expire(self, limit: float) -> list[BatchResult]:
        now = time.monotonic()
        expired: list[BatchResult] = []
        with self._lock:
            for row_thread in self._threads:
                batch = row_thread.batch
                overdue = batch is not None and now - row_thread.started > limit * len(batch.args)
                if overdue and not row_thread.abandoned:
                    row_thread.abandoned = True
                    expired.append(BatchResult(batch, lost=TimeoutError(f"the row ran longer than timeout={limit:g}s")))
            self._threads = [w for w in self._threads if not w.abandoned]
        return expired

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True  # results of batches already running are dropped when they finish
            for row_thread in self._threads:
                if row_thread.batch is not None:
                    row_thread.abandoned = True
            self._threads = [w for w in self._threads if not w.abandoned]
        try:
            while True:
                self._inbox.get_nowait()
        except queue.Empty:
            pass

    def finish(self) -> None:
        for _ in self._threads:
            self._inbox.put(None)
        self._threads = []
