"""Local worker processes: the default backend, for CPU-bound Python functions.

A run borrows the warm :class:`~modal_magic.backends.pool.WarmPool` (another run in another thread
gets a pool of its own) and sizes its share by what it can use: it adds workers only as its batches
need them, never more than ``max_containers`` (default: the core count) and never more than
:func:`~modal_magic.options.process_ceiling` (twice the cores: more processes than that only add
memory for CPU work; a larger ``max_containers`` is capped with a one-time warning). Batches are
bounded in bytes as well as rows (:data:`MAX_BATCH_BYTES`), and each worker holds two: the one it
runs and the next, so it never idles for a round trip.

The function travels with cloudpickle (the user's own modules by value, see
:mod:`modal_magic.shipping`), so lambdas, closures and functions defined in a notebook work. Each
worker has its own socket, so the run always knows which batch a worker held: when a worker dies
(``os._exit``, a segfault, the OOM killer) only that batch is lost, the worker is replaced, and the
engine retries the rows in isolation. A watchdog kills a worker stuck past its rows' timeouts,
counted from when the worker said a batch started, so Python starting and imports never count.

Each run resets the workers it uses to the kernel's current working directory, environment and
``sys.path``, so one function's ``os.chdir`` or ``os.environ[...] = ...`` doesn't leak into the
next run. Workers ignore Ctrl-C: the kernel handles it and kills the busy workers itself, so an
interrupt stops everything at once and the idle workers stay warm.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import time
from collections import deque
from typing import Any

from ..errors import WorkerCrashed
from ..options import cores, process_ceiling
from ..shipping import dumps_function
from .base import Backend, Batch, BatchResult, Task, capped_concurrency
from .pool import SHARED_POOL, Message, WarmPool, WorkerProcess, describe_exit
from .row_runner import dumps

#: extra seconds a worker gets past its rows' timeouts before it's killed as stuck
_STUCK_GRACE_S = 2.0
#: how long a batch sent to a worker may wait to start (Python starting, the function unpickling
#: and importing its modules) before the watchdog counts it; its rows' timeouts start only then
_STARTUP_ALLOWANCE_S = 60.0
#: the most bytes of arguments one batch carries (estimated from a sample of rows)
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: rows sampled to estimate the pickled size of a row's arguments
_SIZE_SAMPLE_ROWS = 64

#: batches a worker holds at once: the one it runs and one waiting, so it never idles for a round trip
_PER_WORKER = 2


class ProcessBackend(Backend):
    """Batches go to worker processes: each runs one and has the next one waiting.

    Workers join a run as its batches need them (a run of 3 rows uses at most 3), up to
    ``max_containers`` (default: the core count) and :func:`process_ceiling`.
    """

    name = "local"
    inline_when_tiny = True

    def __init__(self) -> None:
        self._pool: WarmPool | None = None
        self._own_pool = False
        self._workers: list[WorkerProcess] = []
        self._target = 1
        self._fn_bytes = b""
        self._run_bytes = b""
        self._token = 0
        self._task: Task | None = None

    def start(self, task: Task) -> None:
        self._task = task
        if SHARED_POOL.lock.acquire(blocking=False):
            self._pool = SHARED_POOL
        else:  # another run (another thread) has the warm pool: this one gets workers of its own
            self._pool, self._own_pool = WarmPool(), True
        self._pool.prepare()
        self._fn_bytes = dumps_function(self._shipped(task))
        # every run starts its workers in the kernel's cwd, environment and sys.path as they are now
        self._run_bytes = pickle.dumps(("run", list(sys.path), os.getcwd(), dict(os.environ)), protocol=5)
        # a worker keeps the last function it was sent; anything that changes how it runs rows is part of the token
        self._token = hash((self._fn_bytes, task.star, task.options.retries, task.options.timeout, task.is_async,
                            task.options.timings))
        self._target = capped_concurrency(self._worker_count(task), process_ceiling(), "worker processes",
                                            f"twice its {cores()} cores", self._count_option)
        self._workers = []

    def _worker_count(self, task: Task) -> int:
        return task.options.local_concurrency()

    #: the option that sets :meth:`_worker_count`, named in the warning when it's capped
    _count_option = "max_containers"

    def _shipped(self, task: Task) -> Any:
        """What goes to the workers: the function itself."""
        return task.fn

    def _add_worker(self) -> WorkerProcess:
        """One more worker for this run: a warm one the pool has spare, else a new one."""
        assert self._pool is not None
        taken = set(map(id, self._workers))
        worker = next((w for w in self._pool.workers if id(w) not in taken and not w.gone), None)
        if worker is None:
            worker = self._pool.start_worker()
        worker.send_bytes(self._run_bytes)
        self._workers.append(worker)
        return worker

    def max_batch_rows(self, args: list[Any]) -> int | None:
        """As many rows as fit in :data:`MAX_BATCH_BYTES` of pickled arguments (estimated on a sample)."""
        if not args:
            return None
        step = max(1, len(args) // _SIZE_SAMPLE_ROWS)
        sample = args[::step][:_SIZE_SAMPLE_ROWS]
        try:  # one by one: pickled together, equal rows would be stored once and look smaller
            per_row = sum(len(dumps(row)) for row in sample) / len(sample)
        except Exception:  # the arguments can't be pickled: the batch says so row by row when it runs
            return None
        return max(1, int(MAX_BATCH_BYTES / max(per_row, 1.0)))

    #: batches a worker holds at once
    _per_worker = _PER_WORKER

    @property
    def capacity(self) -> int:
        return self._per_worker * self._target

    @property
    def parallelism(self) -> int:
        return self._target

    def _budget(self, batch: Batch) -> float:
        opts = self._task.options  # type: ignore[union-attr]
        if opts.timeout is None:
            return float("inf")
        per_row = (opts.timeout + 0.5) * (opts.retries + 1) + 5.0 * opts.retries
        return len(batch.args) * per_row + _STUCK_GRACE_S

    def _deadline(self, worker: WorkerProcess) -> float:
        """When the worker counts as stuck: its rows' budgets, counted from when each batch started."""
        deadline = float("inf")
        for batch_id, batch in worker.batches.items():
            budget = self._budget(batch)
            if budget == float("inf"):
                return deadline
            began = worker.started_at.get(batch_id)
            if began is None:  # not started yet: start-up (or the batch ahead of it) isn't its time
                began = worker.sent_at[batch_id] + _STARTUP_ALLOWANCE_S
            deadline = min(deadline, began + budget)
        return deadline

    def submit(self, batch: Batch) -> None:
        idle = next((w for w in self._workers if not w.batches and not w.gone), None)
        if idle is not None:
            worker = idle
        elif len(self._workers) < self._target:
            worker = self._add_worker()
        else:
            worker = min(self._workers, key=lambda w: len(w.batches))
        assert len(worker.batches) < self._per_worker, "the engine keeps within capacity"
        self._send_to(worker, batch)

    def _send_to(self, worker: WorkerProcess, batch: Batch) -> None:
        task = self._task
        assert task is not None
        worker.batches[batch.id] = batch
        worker.sent_at[batch.id] = time.monotonic()
        if worker.fn_token != self._token:
            opts = task.options
            worker.send(("fn", self._fn_bytes, task.star, opts.retries, opts.timeout, task.is_async, opts.timings))
            worker.fn_token = self._token
        # If the worker is dead already, its reader reports it and results() sends this batch again.
        worker.send(("batch", batch.id, len(batch.args), dumps(batch.args)))

    def _forget(self, worker: WorkerProcess) -> list[Batch]:
        batches = list(worker.batches.values())
        worker.batches.clear()
        worker.sent_at.clear()
        worker.started_at.clear()
        return batches

    def _lost(self, worker: WorkerProcess, cause: BaseException) -> list[BatchResult]:
        """A worker is gone: its running batch is lost with ``cause``; the one queued behind never ran."""
        batches = self._forget(worker)
        self._swap(worker)
        if not batches:
            return []
        return [BatchResult(batches[0], lost=cause)] + [BatchResult(b, requeue=True) for b in batches[1:]]

    def results(self, timeout: float | None) -> list[BatchResult]:
        assert self._pool is not None
        busy = [w for w in self._workers if w.batches]
        if not busy:
            return []
        first_deadline = min(self._deadline(w) for w in busy)
        wait_s = None if first_deadline == float("inf") else max(0.0, first_deadline - time.monotonic())
        if timeout is not None:
            wait_s = timeout if wait_s is None else min(wait_s, timeout)
        messages: list[Message] = []
        try:
            messages.append(self._pool.messages.get(timeout=wait_s))
            while True:
                messages.append(self._pool.messages.get_nowait())
        except queue.Empty:
            pass
        out: list[BatchResult] = []
        for worker, data, when in messages:
            out.extend(self._receive(worker, data, when))
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.batches and self._deadline(worker) < now:
                out.extend(self._lost(worker, TimeoutError(
                    f"the worker was stuck past timeout={self._task.options.timeout:g}s "  # type: ignore[union-attr]
                    "and was replaced")))
        return out

    def _receive(self, worker: WorkerProcess, data: bytes | None, when: float) -> list[BatchResult]:
        """One message from a worker: a batch started, a batch finished, or the worker's end."""
        if worker not in self._workers:
            return []  # from a worker this run already replaced, or from an earlier run
        if data is None:
            code = worker.proc.poll()
            if code is None:
                try:
                    code = worker.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # it closed its socket but lives on: end it
                    worker.proc.kill()
                    code = worker.proc.wait(timeout=5)
            return self._lost(worker, WorkerCrashed(f"the worker process running this row {describe_exit(code)}"))
        kind, batch_id = data[:1], int.from_bytes(data[1:9], "little")
        if batch_id not in worker.batches:
            return []  # not a batch this run sent (e.g. from a process the function forked)
        if kind == b"S":
            worker.started_at[batch_id] = when
            return []
        batch = worker.batches.pop(batch_id)
        worker.sent_at.pop(batch_id, None)
        worker.started_at.pop(batch_id, None)
        return [BatchResult.from_packed(batch, memoryview(data)[9:])]

    def _swap(self, worker: WorkerProcess) -> None:
        """Replace a dead or stuck worker in the pool and in this run."""
        assert self._pool is not None
        fresh = self._pool.replace(worker)
        fresh.send_bytes(self._run_bytes)
        self._workers[self._workers.index(worker)] = fresh

    def cancel(self) -> None:
        for worker in list(self._workers):
            if worker.batches:
                self._forget(worker)
                self._swap(worker)

    def finish(self) -> None:
        if self._pool is None:
            return
        now = time.monotonic()
        for worker in self._workers:
            worker.last_used = now
        if self._own_pool:
            self._pool.shutdown()
        else:
            self._pool.schedule_reap()
            self._pool.lock.release()
        self._pool = None
        self._workers = []


class AsyncProcessBackend(ProcessBackend):
    """An ``async def`` function's rows spread over worker processes, each awaiting its share at once.

    One process's CPU caps how many requests a second it can send (about 1,500 through the
    ``openai`` client on a 2-core machine), so a function whose rows are fast requests can ask for
    more processes: its task's ``runtime`` says ``worker_processes`` (how many) and ``for_workers()``
    (what to send them instead of itself, e.g. an LLM row with its API key). ``max_containers`` rows
    are in flight in all, split evenly; each worker runs every batch it holds at once on an event
    loop of its own. Functions that don't ask run on the asyncio backend, in the kernel's process.

    A worker that dies takes every batch it held with it, and which one killed it is unknown: each
    is reported lost *with others*, so the engine gives its rows a try of their own, and a try of
    their own is what they get here: a batch sent again (``attempt > 1``) waits for a worker with
    nothing else to run and has it to itself, so a row that kills its worker then is the culprit.
    """

    inline_when_tiny = False

    def start(self, task: Task) -> None:
        super().start(task)
        self._per_worker = max(1, -(-(task.options.max_containers or self._target) // self._target))
        self._pending: deque[Batch] = deque()  # batches no worker can take yet
        self._alone: set[int] = set()  # ids of workers running a batch sent again, by itself
        self._draining: WorkerProcess | None = None  # emptied for the next batch sent again
        # Each run starts its workers' function afresh: its state (an LLM run's client, rate limits
        # and budget) belongs to one run, even when the next run's function pickles the same.
        self._token = hash((self._token, time.monotonic_ns()))
        for _ in range(self._target):  # the processes were asked for by number: all start now
            self._add_worker()

    def _worker_count(self, task: Task) -> int:
        return task.runtime.worker_processes

    _count_option = "processes"

    def _shipped(self, task: Task) -> Any:
        return task.runtime.for_workers() if task.runtime.for_workers is not None else task.fn

    @property
    def parallelism(self) -> int:
        return self.capacity

    def submit(self, batch: Batch) -> None:
        self._pending.append(batch)
        self._place()

    def _place(self) -> None:
        """Send the waiting batches, in order, to the workers that may take them."""
        while self._pending:
            batch = self._pending[0]
            if batch.attempt > 1:  # a try of its own: an empty worker, kept for it
                worker = next((w for w in self._workers if not w.batches), None)
                if worker is None:
                    if self._draining is None or self._draining not in self._workers:
                        self._draining = min(self._workers, key=lambda w: len(w.batches))
                    return
                self._draining = None
                self._alone.add(id(worker))
            else:
                free = [w for w in self._workers if id(w) not in self._alone and w is not self._draining
                        and len(w.batches) < self._per_worker]
                if not free:
                    return
                worker = min(free, key=lambda w: len(w.batches))
            self._pending.popleft()
            self._send_to(worker, batch)

    def results(self, timeout: float | None) -> list[BatchResult]:
        out = super().results(timeout)
        for worker in self._workers:
            if not worker.batches:
                self._alone.discard(id(worker))
        self._place()
        return out

    def _lost(self, worker: WorkerProcess, cause: BaseException) -> list[BatchResult]:
        """Every batch the worker held was running: all are lost, with others when there were others."""
        batches = self._forget(worker)
        self._alone.discard(id(worker))
        self._swap(worker)
        with_others = len(batches) > 1
        return [BatchResult(b, lost=cause, lost_with_others=with_others) for b in batches]

    def cancel(self) -> None:
        self._pending.clear()
        self._alone.clear()
        super().cancel()
