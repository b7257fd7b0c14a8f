"""Local worker processes: the default backend, for CPU-bound Python functions.

A pool of worker processes is started on first use and kept for the next run (starting Python
costs more than most batches). The function travels with cloudpickle, so lambdas, closures and
functions defined in a notebook work. Each worker has its own socket, so the pool always knows which
batch a worker held: when a worker dies (``os._exit``, a segfault, the OOM killer) only that batch is
lost, the worker is replaced, and the engine retries the rows in isolation. Workers ignore Ctrl-C:
the kernel handles it and kills the busy workers itself, so an interrupt stops everything at once
and the idle workers stay warm.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from collections import deque
from pathlib import Path
from typing import Any

import cloudpickle

from ..errors import WorkerCrashed
from ..shipping import dumps_function
from ._worker import dumps
from .base import Backend, Batch, BatchResult, Task

_WORKER_SCRIPT = str(Path(__file__).with_name("_worker.py"))
#: extra seconds a worker gets past its rows' timeouts before it's killed as stuck
_STUCK_GRACE_S = 2.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Worker:
    """One worker process and the socket to it."""

    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT, str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send_bytes(pickle.dumps(("init", list(sys.path), os.getcwd())))
        self.fn_token: int | None = None
        # by id, in the order sent: for plain functions the running one first, then one queued
        # behind it; an async function's batches all run at once and come back in any order
        self.batches: dict[int, Batch] = {}
        self.deadline = float("inf")  # for the running batch

    def send(self, message: tuple) -> None:
        self.conn.send_bytes(pickle.dumps(message, protocol=5))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered; nothing else to try
            pass
        self.conn.close()

    def stop(self) -> None:
        try:
            self.send(("exit",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.conn.close()


class _Pool:
    """The warm workers kept between runs; one run at a time owns them."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()

    def ensure(self, n: int) -> list[_Worker]:
        for dead in [w for w in self.workers if w.proc.poll() is not None]:
            dead.kill()
            self.workers.remove(dead)
        while len(self.workers) < n:
            self.workers.append(_Worker())
        return self.workers[:n]

    def replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker()
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []


_POOL = _Pool()


def shutdown_pool() -> None:
    """Stop the warm worker processes (they start again on the next run)."""
    with _POOL.lock:
        _POOL.shutdown()


atexit.register(shutdown_pool)


#: batches a worker holds at once: the one it runs and one waiting, so it never idles for a round trip
_PER_WORKER = 2


class ProcessBackend(Backend):
    """Batches go to worker processes: each runs one and has the next one waiting."""

    name = "local"
    inline_when_tiny = True

    def __init__(self) -> None:
        self._pool: _Pool | None = None
        self._own_pool = False
        self._workers: list[_Worker] = []
        self._fn_bytes = b""
        self._token = 0
        self._task: Task | None = None

    def start(self, task: Task) -> None:
        self._task = task
        if _POOL.lock.acquire(blocking=False):
            self._pool = _POOL
        else:  # another run (another thread) has the warm pool: this one gets workers of its own
            self._pool, self._own_pool = _Pool(), True
        self._fn_bytes = dumps_function(self._shipped(task))
        # a worker keeps the last function it was sent; anything that changes how it runs rows is part of the token
        self._token = hash((self._fn_bytes, task.star, task.options.retries, task.options.timeout, task.is_async))
        self._workers = self._pool.ensure(self._worker_count(task))

    def _worker_count(self, task: Task) -> int:
        return task.options.workers()

    def _shipped(self, task: Task) -> Any:
        """What goes to the workers: the function itself."""
        return task.fn

    #: batches a worker holds at once
    _per_worker = _PER_WORKER

    @property
    def capacity(self) -> int:
        return self._per_worker * len(self._workers)

    @property
    def parallelism(self) -> int:
        return len(self._workers)

    def _budget(self, batch: Batch) -> float:
        opts = self._task.options  # type: ignore[union-attr]
        if opts.timeout is None:
            return float("inf")
        per_row = (opts.timeout + 0.5) * (opts.retries + 1) + 5.0 * opts.retries
        return len(batch.args) * per_row + _STUCK_GRACE_S

    def submit(self, batch: Batch) -> None:
        worker = min(self._workers, key=lambda w: len(w.batches))
        assert len(worker.batches) < self._per_worker, "the engine keeps within capacity"
        self._send_to(worker, batch)

    def _send_to(self, worker: _Worker, batch: Batch) -> None:
        task = self._task
        assert task is not None
        if not worker.batches:
            worker.deadline = time.monotonic() + self._budget(batch)
        worker.batches[batch.id] = batch
        try:
            if worker.fn_token != self._token:
                opts = task.options
                worker.send(("fn", self._fn_bytes, task.star, opts.retries, opts.timeout, task.is_async))
                worker.fn_token = self._token
            worker.send(("batch", batch.id, len(batch.args), dumps(batch.args)))
        except OSError:
            # The worker died (e.g. its running batch crashed it) before we read that; results()
            # sees its end of the socket close and sends this batch again, as one that never ran.
            pass

    def _lost(self, worker: _Worker, cause: BaseException) -> list[BatchResult]:
        """A worker is gone: its running batch is lost with ``cause``; the one queued behind never ran."""
        batches = list(worker.batches.values())
        worker.batches.clear()
        self._swap(worker)
        return [BatchResult(batches[0], lost=cause)] + [BatchResult(b, requeue=True) for b in batches[1:]]

    def results(self, timeout: float | None) -> list[BatchResult]:
        busy = [w for w in self._workers if w.batches]
        if not busy:
            return []
        now = time.monotonic()
        first_deadline = min(w.deadline for w in busy)
        wait_s = max(0.0, first_deadline - now) if first_deadline != float("inf") else None
        if timeout is not None:
            wait_s = timeout if wait_s is None else min(wait_s, timeout)
        by_conn = {w.conn: w for w in busy}
        ready = wait(list(by_conn), wait_s)
        out: list[BatchResult] = []
        for conn in ready:
            out.extend(self._receive(by_conn[conn]))
        now = time.monotonic()
        for worker in busy:
            if worker.batches and worker.deadline < now and worker in self._workers:
                out.extend(self._lost(worker, TimeoutError(
                    f"the worker was stuck past timeout={self._task.options.timeout:g}s "  # type: ignore[union-attr]
                    "and was replaced")))
        return out

    def _receive(self, worker: _Worker) -> list[BatchResult]:
        """Read what the worker has sent: every finished batch already waiting, or its death."""
        out: list[BatchResult] = []
        while True:
            try:
                data = worker.conn.recv_bytes()
            except (EOFError, OSError):
                worker.proc.wait(timeout=5)
                code = worker.proc.returncode
                return out + self._lost(worker, WorkerCrashed(f"the worker process running this row {_describe_exit(code)}"))
            if data != b"I":  # (the init acknowledgement, read here to keep start-up off the critical path)
                batch = worker.batches.pop(int.from_bytes(data[1:9], "little"))
                if worker.batches:  # the queued batch starts now
                    worker.deadline = time.monotonic() + self._budget(next(iter(worker.batches.values())))
                values, errors, elapsed = pickle.loads(memoryview(data)[9:])
                out.append(BatchResult(batch, values, errors, elapsed))
            if out and not worker.conn.poll(0):
                return out

    def _swap(self, worker: _Worker) -> None:
        assert self._pool is not None
        fresh = self._pool.replace(worker)
        self._workers[self._workers.index(worker)] = fresh

    def cancel(self) -> None:
        for worker in list(self._workers):
            if worker.batches:
                worker.batches.clear()
                self._swap(worker)

    def finish(self) -> None:
        if self._pool is None:
            return
        if self._own_pool:
            self._pool.shutdown()
        else:
            self._pool.lock.release()
        self._pool = None


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
        processes = self._worker_count(task)
        self._per_worker = max(1, -(-(task.options.max_containers or processes) // processes))
        self._pending: deque[Batch] = deque()  # batches no worker can take yet
        self._alone: set[int] = set()  # ids of workers running a batch sent again, by itself
        self._draining: _Worker | None = None  # emptied for the next batch sent again
        super().start(task)
        # Each run starts its workers' function afresh: its state (an LLM run's client, rate limits
        # and budget) belongs to one run, even when the next run's function pickles the same.
        self._token = hash((self._token, time.monotonic_ns()))

    def _worker_count(self, task: Task) -> int:
        return task.runtime.worker_processes

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

    def _lost(self, worker: _Worker, cause: BaseException) -> list[BatchResult]:
        """Every batch the worker held was running: all are lost, with others when there were others."""
        batches = list(worker.batches.values())
        worker.batches.clear()
        self._alone.discard(id(worker))
        self._swap(worker)
        with_others = len(batches) > 1
        return [BatchResult(b, lost=cause, lost_with_others=with_others) for b in batches]

    def cancel(self) -> None:
        self._pending.clear()
        self._alone.clear()
        super().cancel()
