"""The warm worker processes kept between runs: each process with its socket and threads, and the pool.

Starting Python costs more than most batches, so worker processes outlive a run. A
:class:`WorkerProcess` is one of them: the process (``python row_runner.py FD``), the socket to it,
and two threads in the kernel that move its messages. The reader always drains the socket into
one queue the run waits on, and the writer sends what the run queued for it, so the kernel's main
thread never blocks on a socket and a worker blocked sending a large result always has a reader on
the other side: two sides can never both sit in ``send`` waiting for each other, whatever the
batch and result sizes.

The :class:`WarmPool` holds them; one run at a time owns it. It only shrinks by itself: a worker
idle for :data:`IDLE_TIMEOUT_S` is stopped at the next run's start or by a timer, as loky's
reusable executor does; dead workers are dropped and replaced. How many a run may use is the
run's business (:mod:`modal_magic.backends.processes`), within :func:`modal_magic.options.process_ceiling`.
"""

from __future__ import annotations

import atexit
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .base import Batch

__all__ = ["IDLE_TIMEOUT_S", "Message", "WarmPool", "WorkerProcess", "SHARED_POOL", "describe_exit", "shutdown_pool"]

_WORKER_SCRIPT = str(Path(__file__).with_name("row_runner.py"))
#: a warm worker idle this long is stopped
IDLE_TIMEOUT_S = 300.0


def describe_exit(code: int | None) -> str:
    """How a worker process ended, for a row's error: ``was killed by SIGSEGV``, ``exited with code 3``."""
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


#: one message from a worker as the reader thread hands it on: (worker, bytes or None at EOF, when read)
Message = tuple["WorkerProcess", "bytes | None", float]


class _Spawner:
    """Starts worker processes from a thread that outlives runs.

    A worker asks Linux to kill it when its parent dies (PR_SET_PDEATHSIG), and Linux means the
    parent *thread*: a worker started by a background run's thread (``wait=False``) would be killed
    when that run ends, and the warm pool with it. The main thread never ends before the process, so
    it starts its workers itself; any other thread hands the start to this one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(argv, **kwargs)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="modal_magic-spawner")
            executor = self._executor
        return executor.submit(subprocess.Popen, argv, **kwargs).result()

    def stop(self) -> None:
        """End the spawning thread (with :func:`shutdown_pool`; it starts again when needed)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


_spawner = _Spawner()


class WorkerProcess:
    """One worker process, the socket to it, and the two threads that move its messages."""

    def __init__(self, messages: queue.SimpleQueue[Message]) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        self.proc = _spawner.popen(
            [sys.executable, _WORKER_SCRIPT, str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.fn_token: int | None = None
        # by id, in the order sent: for plain functions the running one first, then one queued
        # behind it; an async function's batches all run at once and come back in any order
        self.batches: dict[int, Batch] = {}
        # when each batch was sent, and when the worker said it started it (its rows' clocks start then)
        self.sent_at: dict[int, float] = {}
        self.started_at: dict[int, float] = {}
        self.last_used = time.monotonic()
        self.gone = False  # its reader saw the socket close
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="modal_magic-worker-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, args=(messages,), name="modal_magic-worker-reader",
                                        daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        while True:
            data = self._outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the worker is gone; the reader reports it

    def _read(self, messages: queue.SimpleQueue[Message]) -> None:
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                break
            messages.put((self, data, time.monotonic()))
        self.gone = True
        self._outbox.put(None)
        self._writer.join(timeout=10)
        self.conn.close()
        messages.put((self, None, time.monotonic()))

    def send(self, message: tuple) -> None:
        """Queue ``message`` for the worker; never blocks (the writer thread sends it)."""
        self._outbox.put(pickle.dumps(message, protocol=5))

    def send_bytes(self, data: bytes) -> None:
        """Queue an already pickled message (the same bytes go to every worker of a run)."""
        self._outbox.put(data)

    def kill(self) -> None:
        """End the process now (SIGKILL) and wait for its reader to report the end."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered; nothing else to try
            pass
        self._reader.join(timeout=5)

    def stop(self) -> None:
        """Ask the process to exit; kill it if it hasn't within 2 seconds."""
        self.send(("exit",))
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


class WarmPool:
    """The warm workers kept between runs; one run at a time owns them."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []
        self.lock = threading.Lock()
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._reaper: threading.Timer | None = None

    def prepare(self) -> None:
        """At a run's start: forget dead and long-idle workers, and messages left from earlier runs."""
        for dead in [w for w in self.workers if w.gone or w.proc.poll() is not None]:
            dead.kill()
            self.workers.remove(dead)
        self.reap()
        while True:
            try:
                self.messages.get_nowait()
            except queue.Empty:
                break

    def reap(self) -> None:
        """Stop the workers idle for longer than :data:`IDLE_TIMEOUT_S`."""
        cutoff = time.monotonic() - IDLE_TIMEOUT_S
        for idle in [w for w in self.workers if not w.batches and w.last_used < cutoff]:
            idle.stop()
            self.workers.remove(idle)

    def start_worker(self) -> WorkerProcess:
        """Start one more worker process and keep it in the pool."""
        worker = WorkerProcess(self.messages)
        self.workers.append(worker)
        return worker

    def replace(self, worker: WorkerProcess) -> WorkerProcess:
        """Kill a dead or stuck worker and put a fresh one in its place."""
        worker.kill()
        fresh = WorkerProcess(self.messages)
        self.workers[self.workers.index(worker)] = fresh
        return fresh

    def schedule_reap(self) -> None:
        """After a run: a timer stops the workers once they have idled past the timeout."""
        if self._reaper is not None:
            self._reaper.cancel()
        if not self.workers:
            return
        self._reaper = threading.Timer(IDLE_TIMEOUT_S + 1.0, self._reap_when_free)
        self._reaper.name = "modal_magic-reaper"
        self._reaper.daemon = True
        self._reaper.start()

    def _reap_when_free(self) -> None:
        if self.lock.acquire(blocking=False):  # a run holds the pool: it reaps at its own end
            try:
                self.reap()
                self.schedule_reap()
            finally:
                self.lock.release()

    def shutdown(self) -> None:
        """Stop every worker and the reaping timer."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for worker in self.workers:
            worker.stop()
        self.workers = []


SHARED_POOL = WarmPool()


def shutdown_pool() -> None:
    """Stop the warm worker processes (they start again on the next run).

    Examples
    --------
    >>> shutdown_pool()
    >>> SHARED_POOL.workers
    []
    """
    with SHARED_POOL.lock:
        SHARED_POOL.shutdown()
    _spawner.stop()


atexit.register(shutdown_pool)
