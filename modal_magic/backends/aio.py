"""``async def`` functions: one event loop in a background thread, ``max_containers`` rows in flight.

I/O-bound coroutines gain nothing from processes, so an async function runs here whichever local
backend was asked for. The loop lives in its own thread because a Jupyter kernel's main thread
already runs a loop (where ``asyncio.run`` refuses to start). Per-row timeouts use
``asyncio.wait_for``, so a slow row is cancelled cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time

from .row_runner import run_rows_async
from .base import Backend, Batch, BatchResult, LoopThread, Task, drain


class AsyncBackend(Backend):
    """Awaits each batch as its own task on a private event loop."""

    name = "asyncio"

    def __init__(self) -> None:
        self._loop: LoopThread | None = None
        self._outbox: queue.SimpleQueue[BatchResult] = queue.SimpleQueue()
        self._tasks: set[asyncio.Task[None]] = set()  # touched only on the loop's thread
        self._task: Task | None = None

    def start(self, task: Task) -> None:
        self._task = task
        self._size = task.options.local_concurrency()
        self._loop = LoopThread("modal_magic-asyncio")
        if task.runtime.aopen is not None:
            # Before any row starts, so that no row's timeout counts it (an LLM run's HTTP client).
            try:
                self._loop.call(task.runtime.aopen()).result()
            except Exception as e:  # each row tries again itself, and fails with the reason if it must
                logging.getLogger("modal_magic").warning("preparing the run failed: %s: %s", type(e).__name__, e)

    @property
    def capacity(self) -> int:
        return self._size

    async def _run(self, batch: Batch) -> None:
        task = self._task
        assert task is not None
        started = time.perf_counter()
        opts = task.options
        seconds: list[float] | None = [] if opts.timings else None
        try:
            values, errors = await run_rows_async(task.fn, task.star, batch.args, opts.retries, opts.timeout, seconds)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the row loop itself broke: the batch is lost, not silently dropped
            self._outbox.put(BatchResult(batch, lost=e))
            return
        self._outbox.put(BatchResult(batch, values, errors, time.perf_counter() - started, row_seconds=seconds))

    def submit(self, batch: Batch) -> None:
        self.submit_many([batch])

    def submit_many(self, batches: list[Batch]) -> None:
        # One wake-up of the loop for all of them: with one-row batches of I/O (LLM calls) a
        # thread hand-off per batch was most of the engine's cost.
        assert self._loop is not None
        self._loop.loop.call_soon_threadsafe(self._start, batches)

    def _start(self, batches: list[Batch]) -> None:
        for batch in batches:
            task = self._loop.loop.create_task(self._run(batch))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def results(self, timeout: float | None) -> list[BatchResult]:
        return drain(self._outbox, timeout)

    def cancel(self) -> None:
        if self._loop is not None:
            self._loop.call(self._cancel_and_wait()).result(timeout=10)

    async def _cancel_and_wait(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def finish(self) -> None:
        self.cancel()
        if self._loop is not None:
            # A function that holds connections (an LLM run's HTTP client) closes them on the loop
            # that opened them, once, here at the end, rather than after every quiet moment.
            aclose = self._task.runtime.aclose if self._task is not None else None
            if aclose is not None:
                try:
                    self._loop.call(aclose()).result(timeout=10)
                except Exception as e:  # teardown: every row's outcome is already filed
                    logging.getLogger("modal_magic").warning("closing the run's connections failed: %s: %s",
                                                             type(e).__name__, e)
            self._loop.stop()
            self._loop = None
